"""Data: source specs -> documents -> forget set (content-hashed) -> token chunks.

A *source spec* is a string: a file, a folder, a glob, or `hf:NAME[:CONFIG]/SPLIT[#column]`.
Every problem a user can fix (missing file, bad JSON line, unknown column, empty set)
raises DataError with a one-line message that names the file, line or column at fault.

Reading texts and hashing them needs no torch (the CLI's read-only commands stay light); only
chunking does, and imports it where it starts.
"""
from __future__ import annotations

import contextlib
import functools
import glob as globlib
import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import DataError

if TYPE_CHECKING:
    import torch

# Files read whole, one document each. Code is included because "licensed code" is a
# forget-set use case (the paper's GitHub split).
SOURCE_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .org .py .pyi .c .h .cc .cpp .cxx .hpp .hh .cs .java .kt "
    ".scala .go .rs .js .jsx .mjs .ts .tsx .rb .php .swift .m .r .jl .lua .pl .hs .ml .sh .bash "
    ".zsh .sql .html .css .xml .yaml .yml .toml".split())
TABLE_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet"})
SUPPORTED_SUFFIXES = SOURCE_SUFFIXES | TABLE_SUFFIXES
JSON_LIST_KEYS = ("data", "rows", "train")  # where common JSON dumps keep their rows
ROLES = ("forget", "retain", "retain_eval", "unseen", "general")
OPTIONAL_ROLES = ("retain_eval", "general")  # retain_eval: held out of retain when not given; general: optional
# The share of retain held out as retain_eval when no retain_eval source is given: the documents utility
# is measured on, which no retain term trains on (a seeded draw, part of the set's hash).
RETAIN_EVAL_SHARE = 0.2
MIN_CHUNK_TOKENS = 16
_TOKENIZE_BATCH = 256  # documents per tokenizer call: fast batching without holding every id list twice


# ---------------------------------------------------------------- sources -> documents

def load_texts(source: str, text_field: str = "text", column: str | None = None) -> list[str]:
    """One source spec -> list of document texts (non-empty after strip; empty docs dropped)."""
    texts = [row[0] for row in load_rows(source, (text_field,), column)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{source} yields no documents")
    return texts


def load_pairs(source: str, prompt_field: str, answer_field: str) -> list[tuple[str, str]]:
    """One source spec of question–answer rows -> [(prompt, answer)]; rows with an empty answer are
    dropped (nothing to score), a row without either field is a one-line DataError."""
    pairs = [(p, a) for p, a in load_rows(source, (prompt_field, answer_field), None, qa=True) if a.strip()]
    if not pairs:
        raise DataError(f"{source} yields no question–answer pairs with a non-empty {answer_field!r}")
    return pairs


def load_rows(source: str, fields: tuple[str, ...], column: str | None = None, qa: bool = False) -> list[tuple[str, ...]]:
    """One source spec -> one tuple of texts per row, a text per field (a text file: one field, its content)."""
    source = os.fspath(source)
    if source.startswith("hf:"):
        rows = _load_hf(source, (column,) if column else fields, qa)
    elif os.path.exists(os.path.expanduser(source)):
        rows = _load_path(Path(os.path.expanduser(source)), fields, column, explicit=True, qa=qa)
    elif globlib.has_magic(source):
        matches = sorted(globlib.glob(os.path.expanduser(source), recursive=True))
        if not matches:
            raise DataError(f"no file matches {source}")
        rows = []
        for m in matches:  # a glob is a selection, so it skips what it cannot read, like a folder
            rows += _load_path(Path(m), fields, column, explicit=False, qa=qa)
    else:
        raise DataError(f"no such file or folder: {source}")
    return rows


def _load_path(path: Path, fields: tuple[str, ...], column: str | None, explicit: bool,
               qa: bool) -> list[tuple[str, ...]]:
    suffixes = TABLE_SUFFIXES if qa else SUPPORTED_SUFFIXES  # a text file has no question and answer
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in suffixes
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return [r for f in files for r in _load_file(f, fields, column)]
    if path.suffix.lower() not in suffixes:
        if explicit:  # the user named this file: say why it is not read rather than skip it
            if qa:
                raise DataError(f"{path}: question–answer rows come from .jsonl, .json, .csv or .parquet files, "
                                f"not {path.suffix or '(no suffix)'!r}")
            raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                            f"use text/code files, .jsonl, .json, .csv or .parquet")
        return []
    return _load_file(path, fields, column)


def _load_file(path: Path, fields: tuple[str, ...], column: str | None) -> list[tuple[str, ...]]:
    suffix = path.suffix.lower()
    if suffix in SOURCE_SUFFIXES:
        return [(path.read_text(encoding="utf-8-sig", errors="replace"),)]
    if suffix == ".jsonl":
        return _load_jsonl(path, fields)
    if suffix == ".json":
        return _load_json(path, fields)
    return _load_table(path, (column,) if column else fields)


def _as_text(value, where: str, field: str) -> str:
    """A cell -> text. Missing values become '' (dropped later); non-text is a user error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _pick(row: dict, fields: tuple[str, ...], where: str) -> tuple[str, ...]:
    for name in fields:
        if name not in row:
            raise DataError(f"{where}: no field {name!r}")
    return tuple(_as_text(row[f], where, f) for f in fields)


def _load_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    texts = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            texts.append(_pick(row, fields, where))
    return texts


def _load_json(path: Path, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if isinstance(data, dict):
        key = next((k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f"{path}: expected a list of rows, or an object with a list "
                            f"under one of {', '.join(JSON_LIST_KEYS)}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    texts = []
    for i, row in enumerate(data):
        where = f"{path}: row {i}"
        if isinstance(row, str) and len(fields) == 1:
            texts.append((row,))
        elif isinstance(row, dict):
            texts.append(_pick(row, fields, where))
        else:
            raise DataError(f"{where}: expected an object or a string, got {type(row).__name__}")
    return texts


def _load_table(path: Path, cols: tuple[str, ...]) -> list[tuple[str, ...]]:
    import pandas as pd  # lazy: keeps `import engine.data` light for the CLI

    try:
        if path.suffix.lower() == ".csv":
            # dtype=str and no NA parsing: text cells such as "NA" or "1984" stay text
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                             encoding_errors="replace")
        else:
            import pyarrow.parquet as pq
            names = pq.read_schema(path).names
            for col in cols:  # check first so we never read a wide table for nothing
                if col not in names:
                    raise DataError(f"{path}: no column {col!r}; columns: {', '.join(names)}")
            df = pd.read_parquet(path, columns=list(dict.fromkeys(cols)))
    except DataError:
        raise
    except Exception as e:  # parser errors come in many types; the user needs one line
        raise DataError(f"{path}: cannot read: {_one_line(e)}") from None
    for col in cols:
        if col not in df.columns:
            raise DataError(f"{path}: no column {col!r}; columns: {', '.join(map(str, df.columns))}")
    values = [df[col].tolist() for col in cols]
    return [tuple(_as_text(v, f"{path}: row {i}", col) for col, v in zip(cols, row))
            for i, row in enumerate(zip(*values))]


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _load_hf(source: str, fields: tuple[str, ...], qa: bool = False) -> list[tuple[str, ...]]:
    """`hf:NAME[:CONFIG]/SPLIT[#column]`; NAME may hold '/', so SPLIT follows the last '/'."""
    spec, _, col = source[3:].partition("#")
    if col and qa:
        raise DataError(f"{source}: '#{col}' names one column; a question–answer source takes its two "
                        f"from --prompt-field and --answer-field")
    fields = (col,) if col else fields
    name, slash, split = spec.rpartition("/")
    if not slash or not name or not split:
        raise DataError(f"{source}: expected hf:NAME[:CONFIG]/SPLIT[#column]")
    config = None
    if os.path.exists(os.path.expanduser(name)):  # a local folder; it keeps any ':' it has
        name = os.path.expanduser(name)
    elif ":" in name:
        name, _, config = name.rpartition(":")
    import datasets  # lazy: the import costs seconds

    offline = None
    try:
        if _is_saved_dataset(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split {split!r}; splits: {', '.join(ds)}")
                ds = ds[split]
            # a single saved Dataset has no splits: SPLIT is accepted and ignored
        else:
            offline = None if os.path.exists(name) else hub_offline_reason()  # a local folder needs no Hub
            with _hub_mode(offline is not None):
                ds = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as e:  # hub, network, auth, builder and split errors: one line for the user
        if offline is not None and _is_connection_error(e):
            raise DataError(f"{source}: not in the local Hugging Face cache ({offline})") from None
        raise DataError(f"{source}: cannot load: {_one_line(e)}") from None
    return dataset_rows(ds, fields, source)


def dataset_rows(ds, fields: tuple[str, ...], where: str) -> list[tuple[str, ...]]:
    """The `fields` of every row of a `datasets.Dataset`, as texts."""
    for col in fields:
        if col not in ds.column_names:
            raise DataError(f"{where}: no column {col!r}; columns: {', '.join(ds.column_names)}")
    values = [ds[col] for col in fields]
    return [tuple(_as_text(v, f"{where}: row {i}", col) for col, v in zip(fields, row))
            for i, row in enumerate(zip(*values))]


HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be asked, or None when it can.

    Without this, a box with no network spends half a minute in huggingface_hub's retries and
    prints a dozen warnings before the one line that matters. HF_HUB_OFFLINE=1 is the user saying
    so; otherwise one TCP connect to the Hub's endpoint, a few seconds at most, tells (skipped
    behind a proxy, which a direct connect cannot judge)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return f"no network: {host} cannot be reached"
    return None


@contextlib.contextmanager
def _hub_mode(offline: bool):
    """Run a `datasets` load in offline mode (cache only) when the Hub cannot be reached, and
    without huggingface_hub's retry warnings either way (the error, if any, is ours to word).

    Both libraries read HF_HUB_OFFLINE once, at import; their module-level switches are what
    they consult afterwards, so those are flipped for the duration and restored."""
    import logging

    import datasets.config
    from huggingface_hub import constants

    hub_logger = logging.getLogger("huggingface_hub")
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, hub_logger.level)
    if offline:
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        hub_logger.setLevel(saved[2])


def _is_connection_error(e: BaseException) -> bool:
    return isinstance(e, ConnectionError) or any(k in type(e).__name__ for k in ("Offline", "LocalEntryNotFound"))


def _is_saved_dataset(name: str) -> bool:
    """True for a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    p = Path(name)
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file())


# ---------------------------------------------------------------- the forget set

def normalize_text(text: str) -> str:
    """The form a text is hashed in: same content, same hash, whatever the OS or editor."""
    text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip()


@dataclass(frozen=True)
class ForgetSetTexts:
    """The documents of the roles (ROLES); retain_eval is empty only in sets made before it existed. A document of a question–answer set is a (prompt, answer)
    pair: its text is the answer and `prompts[role][i]` its prompt; a role missing from `prompts`,
    or a None there, is plain text."""

    forget: list[str]
    retain: list[str]
    unseen: list[str]
    general: list[str]  # may be []
    sources: dict[str, list[str]]  # role -> the source specs it came from
    prompts: dict[str, list[str | None]] = field(default_factory=dict)  # role -> a prompt per document
    # A benchmark preset's evaluation rows, name -> JSON rows (TOFU's perturbed answers, MUSE's knowmem
    # and verbmem: docs/data.md). Not documents of a role: not chunked, not trained on, not in the hash.
    extras: dict[str, list[dict]] = field(default_factory=dict, compare=False)
    # Held out from every retain term: utility (ppl_retain_eval, retain_eval_drift) is measured here.
    retain_eval: list[str] = field(default_factory=list)

    def prompts_of(self, role: str) -> list[str | None]:
        """A prompt (None: plain text) for every document of `role`."""
        got = self.prompts.get(role)
        return list(got) if got is not None else [None] * len(getattr(self, role))

    @property
    def is_qa(self) -> bool:
        return any(p is not None for ps in self.prompts.values() for p in ps)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 over the normalized texts of every role, in ROLES order.

        Length prefixes make boundaries part of the content: ["ab", "c"] != ["a", "bc"],
        and a document moved from forget to retain changes the hash. Order matters too,
        since chunk order (and so batches) follows document order. A question–answer set adds
        each document's prompt after the texts (a marker where it has none), so it never hashes
        like the same answers as plain text; a plain-text set hashes as it always has. An empty
        retain_eval is left out, so a set made before that role existed keeps its hash.
        """
        h = hashlib.sha256()

        def put(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "big"))
            h.update(b)

        for role in self.hashed_roles:
            texts = getattr(self, role)
            put(role.encode())
            put(str(len(texts)).encode())
            for t in texts:
                put(normalize_text(t).encode("utf-8"))
        if self.is_qa:
            put(b"prompts")
            for role in self.hashed_roles:
                put(role.encode())
                for p in self.prompts_of(role):
                    put(b"-" if p is None else b"+" + normalize_text(p).encode("utf-8"))
        return h.hexdigest()

    @property
    def hashed_roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r != "retain_eval" or self.retain_eval)

    def counts(self) -> dict[str, int]:
        return {role: len(getattr(self, role)) for role in ROLES}


def check_qa_fields(prompt_field: str | None, answer_field: str | None) -> bool:
    """True for a question–answer set; both fields or neither, else a one-line DataError."""
    if (prompt_field is None) != (answer_field is None):
        raise DataError("give both --prompt-field and --answer-field (a question–answer set), or neither")
    if prompt_field is not None and prompt_field == answer_field:
        raise DataError(f"--prompt-field and --answer-field are both {prompt_field!r}: they name two fields")
    return prompt_field is not None


def load_forget_set(forget: list[str], retain: list[str], unseen: list[str],
                    general: list[str] | None = None,
                    text_field: str = "text", column: str | None = None,
                    prompt_field: str | None = None, answer_field: str | None = None,
                    retain_eval: list[str] | None = None, retain_eval_share: float = RETAIN_EVAL_SHARE,
                    split_seed: int = 0) -> ForgetSetTexts:
    """Load the roles. Texts are stored normalized, so what is chunked is what is hashed.
    With `prompt_field` and `answer_field`, every source is read as question–answer rows.
    Without `retain_eval` sources, a seeded `retain_eval_share` of the retain documents is held out
    as retain_eval (hold_out_retain_eval)."""
    qa = check_qa_fields(prompt_field, answer_field)
    specs = {"forget": list(forget or []), "retain": list(retain or []), "retain_eval": list(retain_eval or []),
             "unseen": list(unseen or []), "general": list(general or [])}
    texts: dict[str, list[str]] = {}
    prompts: dict[str, list[str | None]] = {}
    for role in ROLES:
        if not specs[role] and role not in OPTIONAL_ROLES:
            raise DataError(f"the {role} set is empty: give it at least one source")
        texts[role], prompts[role] = [], []
        for spec in specs[role]:
            try:
                if qa:  # a row with an empty prompt is plain text (windowed like any text, e.g. code)
                    pairs = load_pairs(spec, prompt_field, answer_field)
                    prompts[role] += [normalize_qa(p) or None for p, _ in pairs]
                    texts[role] += [normalize_qa(a) for _, a in pairs]
                else:
                    texts[role] += [normalize_text(t) for t in load_texts(spec, text_field, column)]
            except DataError as e:  # say which role the bad source was meant for
                raise DataError(f"{role}: {e}") from None
    fs = ForgetSetTexts(**texts, sources=specs, prompts=prompts if qa else {})
    return fs if fs.retain_eval else hold_out_retain_eval(fs, retain_eval_share, split_seed)


def hold_out_retain_eval(fs: ForgetSetTexts, share: float = RETAIN_EVAL_SHARE, seed: int = 0) -> ForgetSetTexts:
    """`fs` with a seeded `share` of its retain documents moved to retain_eval (order kept in both).

    Utility measured on the documents a retain term trains on rewards the methods that optimise the
    metric itself; real benchmarks keep an evaluation split no method trains on, and this is it."""
    import random

    if not 0 < share < 1:
        raise DataError(f"the retain_eval share must be in (0, 1), not {share:g}")
    n = len(fs.retain)
    if n < 2:
        raise DataError(f"the retain set has {n} document(s): holding out a retain_eval share needs at least 2 "
                        f"(or give retain_eval sources of its own)")
    k = min(n - 1, max(1, round(share * n)))
    held = set(random.Random(seed).sample(range(n), k))
    keep = [i for i in range(n) if i not in held]
    out = sorted(held)
    prompts = dict(fs.prompts)
    if fs.prompts:
        retain_prompts = fs.prompts_of("retain")
        prompts["retain"] = [retain_prompts[i] for i in keep]
        prompts["retain_eval"] = [retain_prompts[i] for i in out]
    sources = {**fs.sources, "retain_eval": []}
    return replace(fs, retain=[fs.retain[i] for i in keep], retain_eval=[fs.retain[i] for i in out],
                   prompts=prompts, sources=sources)


def normalize_qa(text: str) -> str:
    """A prompt or an answer as stored: normalized and stripped at both ends (the one space that
    joins them is the chunker's, see QA_SEPARATOR)."""
    return normalize_text(text).strip()


# ---------------------------------------------------------------- documents -> chunks

@dataclass
class Chunks:
    input_ids: torch.LongTensor  # [n, L], right-padded with the pad id
    attention_mask: torch.LongTensor  # [n, L], 1 on real tokens; pad positions never count
    texts: list[str]  # decoded text of the scored tokens of each chunk, for the zlib MIA
    doc_index: list[int]  # document each chunk came from
    # [n, L], 1 on the tokens every loss and metric scores: the attention mask for plain text, the
    # answer's tokens of a question–answer chunk (its prompt is context the model reads, never scores)
    loss_mask: torch.LongTensor | None = None

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def subset(self, idx) -> "Chunks":
        """Rows by index list/tensor (a bool mask works too); L is kept."""
        import torch

        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().reshape(-1)
        rows = idx.tolist()
        return Chunks(self.input_ids[idx], self.attention_mask[idx],
                      [self.texts[i] for i in rows], [self.doc_index[i] for i in rows], self.loss_mask[idx])


# A question–answer document is tokenized as the text `prompt + QA_SEPARATOR + answer`, the way the
# model would read a question followed by its answer; tokens up to where that text's ids part from
# the prompt's own are the prompt's (a token that straddles the join holds answer text: it counts).
QA_SEPARATOR = " "


def _qa_window(full: list[int], prompt: list[int], seq_len: int, bos_id, where: str) -> tuple[list[int], int]:
    """(the ids of one question–answer chunk, how many of them are context): the answer whole, the
    prompt cut from the left (after any BOS) when the pair is longer than seq_len."""
    start = 0
    while start < min(len(full), len(prompt)) and full[start] == prompt[start]:
        start += 1
    n_answer = len(full) - start
    if n_answer == 0:
        raise DataError(f"{where}: its answer has no tokens")
    if len(full) <= seq_len:
        return full, start
    head = 1 if bos_id is not None and start and full[0] == bos_id else 0
    room = seq_len - n_answer - head  # prompt tokens that fit beside the answer
    if room < 1 - head:  # the first answer token must be predicted from something
        raise DataError(f"{where}: its answer alone is {n_answer} tokens, more than seq_len={seq_len} holds "
                        f"(answers are never cut: raise --seq-len or drop the pair)")
    return full[:head] + full[start - room:start] + full[start:], head + room


def pad_id(tokenizer) -> int:
    """The id chunks are padded with: the tokenizer's pad, else its eos, else 0 (pads never count)."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def chunk_texts(texts: list[str], tokenizer, seq_len: int, role: str = "set",
                prompts: list[str | None] | None = None) -> Chunks:
    """Each document on its own (BOS where the tokenizer adds one), cut into non-overlapping
    windows of seq_len tokens; windows under MIN_CHUNK_TOKENS are dropped as too short to
    score, the rest right-padded to the longest kept window.

    A document with a prompt (`prompts[i]` not None) is one question–answer chunk instead: the
    prompt's tokens are context (loss mask 0), the answer's are scored; never cut into windows nor
    joined to another document, and kept however short."""
    import torch

    if seq_len < MIN_CHUNK_TOKENS:
        raise DataError(f"seq_len={seq_len} is below the minimum chunk of {MIN_CHUNK_TOKENS} tokens")
    windows: list[list[int]] = []
    context: list[int] = []  # per window: leading tokens that are prompt (0 for plain text)
    doc_index: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start:start + _TOKENIZE_BATCH])
        asked = list(prompts[start:start + _TOKENIZE_BATCH]) if prompts is not None else [None] * len(batch)
        qa = [i for i, p in enumerate(asked) if p is not None]
        joined = [p + QA_SEPARATOR + t if p else t for p, t in zip(asked, batch)]
        # verbose=False: documents longer than model_max_length are expected, we cut them here
        ids_per_doc = tokenizer(joined, add_special_tokens=True, verbose=False)["input_ids"]
        prompt_ids = dict(zip(qa, tokenizer([asked[i] for i in qa], add_special_tokens=True,
                                            verbose=False)["input_ids"])) if qa else {}
        for d, ids in enumerate(ids_per_doc, start):
            if d - start in prompt_ids:
                window, n_context = _qa_window(ids, prompt_ids[d - start], seq_len, tokenizer.bos_token_id,
                                               f"{role}: document {d}")
                windows.append(window)
                context.append(n_context)
                doc_index.append(d)
                continue
            for w in range(0, len(ids), seq_len):
                window = ids[w:w + seq_len]
                if len(window) >= MIN_CHUNK_TOKENS:
                    windows.append(window)
                    context.append(0)
                    doc_index.append(d)
    if not windows:
        raise DataError(f"the {role} set is empty after chunking (every window is under "
                        f"{MIN_CHUNK_TOKENS} tokens at seq_len={seq_len})")
    pad = pad_id(tokenizer)
    length = max(map(len, windows))
    input_ids = torch.full((len(windows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
    for r, window in enumerate(windows):
        input_ids[r, :len(window)] = torch.tensor(window, dtype=torch.long)
        attention_mask[r, :len(window)] = 1
    loss_mask = None  # plain text: the attention mask itself
    if any(context):
        loss_mask = attention_mask.clone()
        for r, n in enumerate(context):
            loss_mask[r, :n] = 0
    decoded = tokenizer.batch_decode([w[n:] for w, n in zip(windows, context)], skip_special_tokens=True)
    return Chunks(input_ids, attention_mask, decoded, doc_index, loss_mask)


@dataclass
class ForgetSetChunks:
    forget: Chunks
    retain: Chunks
    unseen: Chunks
    general: Chunks | None
    retain_eval: Chunks | None = None  # None only for a set made before the role existed

    def items(self) -> list[tuple[str, Chunks]]:
        return [(r, c) for r in ROLES if (c := getattr(self, r)) is not None]


def chunk_forget_set(fs: ForgetSetTexts, tokenizer, seq_len: int) -> ForgetSetChunks:
    def chunk(role: str) -> Chunks:
        return chunk_texts(getattr(fs, role), tokenizer, seq_len, role=role,
                           prompts=fs.prompts_of(role) if role in fs.prompts else None)

    return ForgetSetChunks(chunk("forget"), chunk("retain"), chunk("unseen"),
                           chunk("general") if fs.general else None,
                           chunk("retain_eval") if fs.retain_eval else None)
