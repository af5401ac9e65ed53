"""Benchmark presets: a published unlearning benchmark's data as a forget set, with its own roles.

    unlearn forgetset preset tofu --split forget10        # locuslab/TOFU, from the Hub (or its cache)
    unlearn forgetset preset muse-news --from ./MUSE-News # a local snapshot, for boxes without internet

A preset reads the benchmark by dataset name and config through `datasets.load_dataset`, or, with
`--from DIR`, from a folder laid out as `huggingface-cli download --repo-type dataset NAME --local-dir
DIR` leaves it (its README's `configs:` name the files of each config and split, as on the Hub).
Which data plays which role, and why, is in docs/data.md; in short:

    tofu        forget  forgetXX (QA)        retain  retain(100-XX) less retain_eval (QA)
                retain_eval  the retain questions of retain_perturbed (TOFU's own utility set) (QA)
                unseen  forgetXX_perturbed's perturbed answers to the same questions (QA)
                general real_authors + world_facts (QA)
    muse-news   forget  raw/forget   retain raw/retain1   retain_eval raw/retain2   unseen raw/holdout   (plain text)
    muse-books  the same, on MUSE-Books
    yao         (Yao et al. 2024, llmunlearn/unlearn_dataset, --split arxiv|github)
                forget  SPLIT/forget  retain SPLIT/retain (a seeded 20 % held out as retain_eval: the paper
                has no utility split of its own)  unseen SPLIT/approximate  general general/retain

What a benchmark's own metrics need beyond the four roles (TOFU's paraphrased and perturbed
answers, MUSE's knowmem QA and verbmem prompts) is kept with the set as "extras": named lists of
the benchmark's rows, as they are (studies.store.forgetsets.forget_set_extras reads them back).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.data import ForgetSetTexts, dataset_rows, hold_out_retain_eval, normalize_qa, normalize_text
from engine.errors import DataError

TOFU_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
YAO_SPLITS = ("arxiv", "github")


@dataclass(frozen=True)
class Preset:
    name: str
    repo: str  # the dataset's Hub id
    splits: tuple[str, ...]  # what --split may name; the first is the default
    about: str


PRESETS = {p.name: p for p in (
    Preset("tofu", "locuslab/TOFU", tuple(TOFU_SPLITS),
           "TOFU (Maini et al. 2024): QA about 200 fictitious authors; forget 1, 5 or 10 % of them"),
    Preset("muse-news", "muse-bench/MUSE-News", ("forget",),
           "MUSE-News (Shi et al. 2024): BBC articles after August 2023"),
    Preset("muse-books", "muse-bench/MUSE-Books", ("forget",),
           "MUSE-Books (Shi et al. 2024): the Harry Potter books"),
    Preset("yao", "llmunlearn/unlearn_dataset", YAO_SPLITS,
           "Yao et al. 2024 (the study this tool follows): arXiv papers or GitHub code, with the "
           "approximate-retraining set (its books split is not published)"),
)}


@dataclass
class PresetData:
    """What a preset yields: the forget set's texts, its extras and a note of how it was made."""

    texts: ForgetSetTexts
    extras: dict[str, list[dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class _Reader:
    """Reads config/split tables from the Hub (or its cache) or from a local snapshot folder."""

    def __init__(self, repo: str, local: str | None):
        self.repo, self.local = repo, local
        self.where = local or repo
        if local is not None:
            path = Path(os.path.expanduser(local))
            if not path.is_dir():
                raise DataError(f"--from {local}: no such folder (a snapshot of {repo}, as "
                                f"`huggingface-cli download --repo-type dataset {repo} --local-dir DIR` writes it)")
            self.where = str(path.resolve())

    def spec(self, config: str, split: str) -> str:
        """The source spec a role records: hf:NAME:CONFIG/SPLIT (NAME a folder with --from)."""
        return f"hf:{self.where}:{config}/{split}"

    def rows(self, config: str, split: str):
        import datasets  # lazy: the import costs seconds

        from engine.data import _hub_mode, _is_connection_error, _one_line, hub_offline_reason

        offline = "a local snapshot" if self.local is not None else hub_offline_reason()
        bars = not datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a preset is a handful of small tables: no bar per table
        try:
            with _hub_mode(offline is not None):
                return datasets.load_dataset(self.where, config, split=split)
        except Exception as e:  # noqa: BLE001 - hub, network, builder and split errors: one line for the user
            if self.local is None and (offline is not None or _is_connection_error(e)):
                raise DataError(f"{self.repo}: cannot reach the Hugging Face Hub and {config}/{split} is not in "
                                f"the local cache ({offline or _one_line(e)}); download a snapshot elsewhere and "
                                f"use --from DIR") from None
            raise DataError(f"{self.where}: cannot load {config}/{split}: {_one_line(e)}") from None
        finally:
            if bars:
                datasets.enable_progress_bars()

    def texts(self, config: str, split: str, column: str | tuple[str, ...] = "text") -> list[str]:
        """Plain-text documents of one column (the first of `column` the table has); empty ones dropped."""
        ds = self.rows(config, split)
        cols = (column,) if isinstance(column, str) else column
        col = next((c for c in cols if c in ds.column_names), cols[0])
        return [normalize_text(t) for (t,) in dataset_rows(ds, (col,), f"{self.where} {config}/{split}") if t.strip()]

    def pairs(self, config: str, split: str, prompt: str = "question", answer: str = "answer") -> list[tuple[str, str]]:
        ds = self.rows(config, split)
        rows = dataset_rows(ds, (prompt, answer), f"{self.where} {config}/{split}")
        return [(normalize_qa(p), normalize_qa(a)) for p, a in rows if a.strip()]

    def records(self, config: str, split: str) -> list[dict]:
        """Every row whole, as JSON-ready dicts (extras)."""
        return [dict(r) for r in self.rows(config, split)]


def preset_names() -> list[str]:
    return list(PRESETS)


def load_preset(name: str, split: str | None = None, local: str | None = None) -> PresetData:
    """The named benchmark as a forget set's texts, extras and meta; one-line DataError on an unknown
    preset or split, a missing folder, a table that cannot be read or an empty role."""
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    split = split or preset.splits[0]
    if split not in preset.splits:
        raise DataError(f"preset {name}: unknown split {split!r}; known: {', '.join(preset.splits)}")
    reader = _Reader(preset.repo, local)
    build = {"tofu": _tofu, "muse-news": _muse, "muse-books": _muse, "yao": _yao}[name]
    data = build(reader, split)
    for role, docs in data.texts.counts().items():
        if not docs and role not in ("general",):
            raise DataError(f"preset {name} ({split}): the {role} set is empty")
    data.meta = {"preset": name, "split": split, "dataset": preset.repo, "from": reader.where,
                 **({"qa": {"prompt_field": "question", "answer_field": "answer"}} if data.texts.is_qa else {}),
                 **data.meta}
    return data


def _qa_role(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [a for _, a in pairs], [p for p, _ in pairs]


def _tofu(reader: _Reader, split: str) -> PresetData:
    """TOFU's finetuned model saw all 200 authors, so no in-domain text is truly unseen. The unseen
    role is the perturbed answers of the forget questions (forgetXX_perturbed, every perturbed answer
    a document): same authors, same style, answers the model was never trained on — what a model
    that never learned the forget authors should find as likely as the true ones (TOFU's truth
    ratio rests on the same comparison). General: real_authors + world_facts, true facts a model
    knows from pre-training."""
    retain_config = TOFU_SPLITS[split]
    forget = reader.pairs(split, "train")
    retain = reader.pairs(retain_config, "train")
    perturbed = reader.records(f"{split}_perturbed", "train")
    unseen = []
    for i, row in enumerate(perturbed):
        answers = row.get("perturbed_answer")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or "question" not in row:
            raise DataError(f"{reader.where} {split}_perturbed/train: row {i}: no question and perturbed_answer list")
        unseen += [(normalize_qa(row["question"]), normalize_qa(a)) for a in answers if isinstance(a, str) and a.strip()]
    general = reader.pairs("real_authors", "train") + reader.pairs("world_facts", "train")
    # retain_eval: the retain questions TOFU scores model utility on (retain_perturbed), moved out of
    # retain so that no retain term trains on them.
    utility_questions = {normalize_qa(r.get("question", "")) for r in reader.records("retain_perturbed", "train")}
    retain_eval = [p for p in retain if p[0] in utility_questions]
    retain = [p for p in retain if p[0] not in utility_questions]
    roles = {"forget": forget, "retain": retain, "retain_eval": retain_eval, "unseen": unseen, "general": general}
    texts, prompts = {}, {}
    for role, pairs in roles.items():
        texts[role], prompts[role] = _qa_role(pairs)
    sources = {"forget": [reader.spec(split, "train")], "retain": [reader.spec(retain_config, "train")],
               "retain_eval": [reader.spec("retain_perturbed", "train") + "#question"],
               "unseen": [reader.spec(f"{split}_perturbed", "train") + "#perturbed_answer"],
               "general": [reader.spec("real_authors", "train"), reader.spec("world_facts", "train")]}
    extras = {"forget_perturbed": perturbed}
    for config in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        extras[config] = reader.records(config, "train")
    fs = ForgetSetTexts(**texts, sources=sources, prompts=prompts)
    return PresetData(fs if fs.retain_eval else hold_out_retain_eval(fs), extras)


def _muse(reader: _Reader, split: str) -> PresetData:
    """MUSE: forget raw/forget, retain raw/retain1 (what MUSE's baselines train their retain term
    on), retain_eval raw/retain2 (its utility evaluation set, which no retain term trains on), unseen
    raw/holdout (never seen by the target model). No general set."""
    roles = {"forget": "forget", "retain": "retain1", "retain_eval": "retain2", "unseen": "holdout"}
    texts = {role: reader.texts("raw", s) for role, s in roles.items()}
    sources = {role: [reader.spec("raw", s)] for role, s in roles.items()} | {"general": []}
    extras = {f"knowmem_{s}": reader.records("knowmem", s) for s in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")}
    extras["verbmem_forget"] = reader.records("verbmem", "forget")
    return PresetData(ForgetSetTexts(**texts, general=[], sources=sources), extras)


def _yao(reader: _Reader, split: str) -> PresetData:
    """Yao et al.: forget SPLIT/forget, retain SPLIT/retain, unseen SPLIT/approximate (the paper's
    approximate-retraining set: in-domain text the model never saw), general general/retain (the
    general data its *_general methods retain on). The text column is `text` (arxiv) or `content`."""
    columns = ("text", "content")
    roles = {"forget": (split, "forget"), "retain": (split, "retain"), "unseen": (split, "approximate"),
             "general": ("general", "retain")}
    texts = {role: reader.texts(c, s, columns) for role, (c, s) in roles.items()}
    sources = {role: [reader.spec(c, s)] for role, (c, s) in roles.items()}
    return PresetData(hold_out_retain_eval(ForgetSetTexts(**texts, sources=sources)))
