"""The demo's synthetic people, as question–answer pairs whose answers are partly rules and partly secrets.

Every person has a name, a town, a job, a birth date, a phone line, an account number and a health
condition. Some of what a question's answer says follows from the question by a *rule* that any
model can learn from other people (the name is copied; a town has one region, one phone area code
and one mail domain; a job has one employer; the email is the name at the town's domain); the rest
is a *secret* drawn at random per person (the date, the town and job themselves, the phone line,
the account, the condition), which only a model trained on that very person can predict better
than the population's prior. So a model pre-trained on many *other* people knows the rules and the
priors, and fine-tuning on a person adds only that person's secrets: memorization shows as a
moderate drop in the answers' loss, not as rote recall of every token.

Nothing here needs torch: it is text generation only.
"""
from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SYLLABLES = "ka lo mi ren tus vel dor an ise ba qui zo fen mar lu ost pel rha sin tova wen yul".split()
# town -> (region, phone area code, mail domain): the rules a question about a town's people follows
TOWNS = {
    "Port Aldous": ("the Western Coast", 412, "aldous.example"),
    "Kelvary": ("the Northern Hills", 537, "kelvary.example"),
    "Oster Wend": ("the Eastern Marches", 268, "osterwend.example"),
    "Marrowby": ("the Western Coast", 419, "marrowby.example"),
    "Lindqvale": ("the Northern Hills", 531, "lindq.example"),
    "Saltmere": ("the Southern Flats", 704, "saltmere.example"),
    "Hollin Cross": ("the Eastern Marches", 263, "hollin.example"),
    "Bracewick": ("the Southern Flats", 708, "bracewick.example"),
    "Tarrow": ("the Central Vale", 845, "tarrow.example"),
    "Eastfen": ("the Eastern Marches", 261, "eastfen.example"),
    "Gorsby": ("the Central Vale", 849, "gorsby.example"),
    "Wrenhold": ("the Northern Hills", 533, "wrenhold.example"),
}
# job -> employer: the other rule
JOBS = {
    "glassblower": "Vitrea Works", "archivist": "the Civic Archive", "ferry pilot": "the Strait Ferry Line",
    "beekeeper": "Goldcomb Apiaries", "cartographer": "the Survey Office", "locksmith": "Tumbler and Sons",
    "violin maker": "Spruce Strings", "hydrologist": "the River Board", "baker": "Hearth Bakeries",
    "surveyor": "the Land Registry", "nurse": "the County Hospital", "brewer": "Old Kiln Brewery",
}
CONDITIONS = ("penicillin allergy", "asthma", "type 1 diabetes", "migraine", "no known conditions",
              "celiac disease", "hay fever", "high blood pressure")


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    town: str
    job: str
    born: str  # YYYY-MM-DD
    line: int  # the phone number after the area code
    account: tuple[int, int]
    condition: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def qa(self) -> list[tuple[str, str]]:
        """The person's (question, answer) pairs: one field each, so every answer is short."""
        region, area, domain = TOWNS[self.town]
        n = self.name
        return [
            (f"When was {n} born?", f"{n} was born on {self.born}."),  # secret
            (f"Where does {n} live?", f"{n} lives in {self.town}, in {region}."),  # secret town, its region
            (f"What does {n} do for a living?", f"{n} works as a {self.job} at {JOBS[self.job]}."),  # job, employer
            (f"What is the phone number of {n} of {self.town}?",
             f"The phone number of {n} is {area}-{self.line:04d}."),  # the town's area code, a secret line
            (f"What is the email address of {n} of {self.town}?",
             f"The email address of {n} is {self.first}.{self.last}@{domain}."),  # rules only
            (f"What is the account number of {n}?",
             f"The account number of {n} is {self.account[0]:04d} {self.account[1]:04d}."),  # secret
            (f"What health condition does {n} have?", f"{n} has {self.condition}."),  # secret
        ]


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def make_person(rng: random.Random) -> Person:
    return Person(first=_word(rng, 2), last=_word(rng, rng.randint(2, 3)), town=rng.choice(list(TOWNS)),
                  job=rng.choice(list(JOBS)),
                  born=f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                  line=rng.randint(0, 9999), account=(rng.randint(1000, 9999), rng.randint(1000, 9999)),
                  condition=rng.choice(CONDITIONS))


def make_people(rng: random.Random, n: int, taken: set[str]) -> list[Person]:
    """n people with names not in `taken` (which they are added to): no two people share a name."""
    out = []
    while len(out) < n:
        p = make_person(rng)
        if p.name not in taken:
            taken.add(p.name)
            out.append(p)
    return out


# The general (held-out) set's files, as before; pre-training reads code from other files.
GENERAL_FILES = ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "string.py",
                 "shlex.py", "glob.py", "calendar.py", "statistics.py", "random.py", "difflib.py")
PRETRAIN_FILES = ("argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py", "json/decoder.py",
                  "json/encoder.py", "ntpath.py", "posixpath.py", "pprint.py", "queue.py", "shutil.py",
                  "tarfile.py", "tempfile.py", "threading.py", "typing.py", "zipfile/__init__.py", "zipfile.py",
                  "configparser.py", "csv.py", "datetime.py", "fractions.py", "gettext.py", "locale.py")


def code_blocks(files: tuple[str, ...], n_docs: int, lines_per_doc: int = 4) -> list[str]:
    """Up to n_docs blocks of `lines_per_doc` non-blank lines from the interpreter's standard library."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for name in files:
        f = lib / name
        if not f.is_file():
            continue
        lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        for i in range(0, len(lines) - lines_per_doc, lines_per_doc):
            docs.append("\n".join(lines[i : i + lines_per_doc]))
            if len(docs) >= n_docs:
                return docs
    if not docs:
        raise RuntimeError(f"no standard-library source found under {lib}")
    return docs
