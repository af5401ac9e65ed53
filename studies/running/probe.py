"""Checks that need transformers or datasets, run in a child process so the caller (the app) never
imports them: `python -m studies.running.probe model|count|preview ...` prints one JSON object on stdout.

    model PATH_OR_ID [--trust-remote-code]        config and tokenizer load? model type, vocab, parameters
    count --role forget=SPEC ... [--tokenizer T --seq-len N] [--text-field F] [--column C]
                                                  documents (and tokens, chunks) per role
    preview SPEC [--text-field F] [--column C] [-n 5] [--chars 400]
                                                  document count and the first few documents of one source

Every answer is {"ok": true, ...} or {"ok": false, "error": "<one line>"}; the process never prints
a traceback on stdout. The Python wrappers below (`probe_model`, `count_tokens`, `source_summary`)
run it with a timeout and always return such a dict. This module's top level imports nothing heavy,
so the app may import it; the engine is imported inside the functions that run in the child.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent  # so the child finds `studies` even when not installed
PREVIEW_DOCS, PREVIEW_CHARS = 5, 400


# ------------------------------------------------------------------ the wrappers (caller's process)

def probe_model(path: str, timeout: float = 120.0, trust_remote_code: bool = False,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """{"ok": True, "model_type", "vocab_size", "tokenizer_vocab", "parameters", ...} or {"ok": False, "error"}."""
    return run_probe(["model", path] + (["--trust-remote-code"] if trust_remote_code else []), timeout, should_stop)


def count_tokens(roles: dict[str, list[str]], tokenizer: str | None = None, seq_len: int = 512,
                 text_field: str = "text", column: str | None = None, timeout: float = 600.0,
                 should_stop: Callable[[], bool] | None = None) -> dict:
    """{"ok": True, "roles": {role: {"documents", "tokens", "chunks"}}} (tokens and chunks None
    without a tokenizer) or {"ok": False, "error"}."""
    args = ["count", "--seq-len", str(seq_len), "--text-field", text_field]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    if column:
        args += ["--column", column]
    for role, specs in roles.items():
        args += [a for spec in specs for a in ("--role", f"{role}={spec}")]
    return run_probe(args, timeout, should_stop)


def source_summary(spec: str, text_field: str = "text", column: str | None = None, n: int = PREVIEW_DOCS,
                   chars: int = PREVIEW_CHARS, timeout: float = 300.0,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Documents and a preview of one source: read here for local files (engine.data's readers
    import no training library), in a child for `hf:` sources (those import `datasets`)."""
    if needs_child(spec):
        args = ["preview", spec, "--text-field", text_field, "-n", str(n), "--chars", str(chars)]
        return run_probe(args + (["--column", column] if column else []), timeout, should_stop)
    return _answer(lambda: read_source(spec, text_field, column, n, chars))


def needs_child(spec: str) -> bool:
    """Reading this source would import `datasets`."""
    return spec.startswith("hf:")


def run_probe(args: list[str], timeout: float = 120.0, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run `python -m studies.running.probe ARGS` and return its JSON answer; a child that fails, hangs past
    `timeout` or is stopped (should_stop() true) comes back as {"ok": False, "error": one line}."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "studies.running.probe", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    except OSError as e:
        return {"ok": False, "error": f"cannot start the probe: {e}"}
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            stopped = bool(should_stop and should_stop())
            if stopped or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                if stopped:
                    return {"ok": False, "error": "stopped", "stopped": True}
                return {"ok": False, "error": f"no answer after {timeout:g} s"}
    return parse_answer(out, err, proc.returncode)


def parse_answer(stdout: str, stderr: str, returncode: int) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(answer, dict) and "ok" in answer:
                return answer
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return {"ok": False, "error": lines[-1] if lines else f"the probe exited with code {returncode}"}


# ------------------------------------------------------------------ the checks (child's process)

def read_source(spec: str, text_field: str = "text", column: str | None = None, n: int = PREVIEW_DOCS,
                chars: int = PREVIEW_CHARS) -> dict:
    from engine.data import load_texts, normalize_text

    texts = [normalize_text(t) for t in load_texts(spec, text_field, column)]
    return {"ok": True, "source": spec, "documents": len(texts),
            "preview": [t if len(t) <= chars else t[:chars].rstrip() + "…" for t in texts[:n]]}


def check_model(path: str, trust_remote_code: bool = False) -> dict:
    from engine.errors import UnlearnError
    from engine.models import check_local_model

    check_local_model(path)
    offline = _go_offline_without_hub(path)
    from transformers import AutoConfig

    from engine.models import load_tokenizer, quiet_transformers

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, hub errors: one line for the user
        if offline:
            raise UnlearnError(f"{path}: not in the local Hugging Face cache ({offline})") from None
        raise UnlearnError(f"cannot load config {path!r}: {_one_line(e)}") from None
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return {"ok": True, "model": path, "model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or []),
            "vocab_size": getattr(config, "vocab_size", None), "tokenizer_vocab": len(tok),
            "parameters": _parameters(config, trust_remote_code)}


def _go_offline_without_hub(path: str) -> str | None:
    """A hub id on a box without network: ask the local cache only (else huggingface_hub retries
    for half a minute). Set before transformers is imported, which reads it once."""
    if os.path.exists(os.path.expanduser(path)):
        return None
    from engine.data import hub_offline_reason

    reason = hub_offline_reason()
    if reason:
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    return reason


def _parameters(config, trust_remote_code: bool) -> int | None:
    """Parameters of the model the config describes, built on the meta device (no memory, no
    weights read); None when that model class cannot be built from the config alone."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def count(roles: dict[str, list[str]], tokenizer: str | None, seq_len: int, text_field: str = "text",
          column: str | None = None) -> dict:
    from engine.data import ROLES, DataError, chunk_texts, load_texts, normalize_text

    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise DataError(f"unknown role {unknown[0]!r}; roles: {', '.join(ROLES)}")
    texts: dict[str, list[str]] = {}
    for role, specs in roles.items():
        texts[role] = []
        for spec in specs:
            try:
                texts[role] += [normalize_text(t) for t in load_texts(spec, text_field, column)]
            except DataError as e:
                raise DataError(f"{role}: {e}") from None
    tok = None
    if tokenizer:
        from engine.models import load_tokenizer

        tok = load_tokenizer(tokenizer)
    out = {}
    for role, docs in texts.items():
        row = {"documents": len(docs), "tokens": None, "chunks": None}
        if tok is not None:
            try:
                chunks = chunk_texts(docs, tok, seq_len, role=role)
                row.update(tokens=chunks.n_tokens, chunks=len(chunks))
            except DataError as e:  # too short to chunk: a count of zero, and why
                row.update(tokens=0, chunks=0, note=str(e))
        out[role] = row
    return {"ok": True, "seq_len": seq_len, "tokenizer": tokenizer, "roles": out}


def _roles(pairs: list[str]) -> dict[str, list[str]]:
    from engine.errors import UnlearnError

    roles: dict[str, list[str]] = {}
    for pair in pairs:
        role, eq, spec = pair.partition("=")
        if not eq or not spec:
            raise UnlearnError(f"--role takes ROLE=SOURCE, not {pair!r}")
        roles.setdefault(role.strip(), []).append(spec)
    return roles


def _answer(fn: Callable[[], dict]) -> dict:
    """fn's dict, or the error as one line: what a user can fix as it is, anything else with its type."""
    try:
        return fn()
    except Exception as e:
        from engine.errors import UnlearnError

        return {"ok": False, "error": _one_line(e) if isinstance(e, UnlearnError) else _typed_line(e)}


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _typed_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {_one_line(e)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.running.probe", description="checks for the app, as one JSON line")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("path")
    m.add_argument("--trust-remote-code", action="store_true")
    c = sub.add_parser("count")
    c.add_argument("--role", action="append", default=[], help="ROLE=SOURCE, repeated")
    c.add_argument("--tokenizer")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--text-field", default="text")
    c.add_argument("--column")
    v = sub.add_parser("preview")
    v.add_argument("source")
    v.add_argument("--text-field", default="text")
    v.add_argument("--column")
    v.add_argument("-n", type=int, default=PREVIEW_DOCS)
    v.add_argument("--chars", type=int, default=PREVIEW_CHARS)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # a library's print must not break the one JSON line
        if a.cmd == "model":
            answer = _answer(lambda: check_model(a.path, a.trust_remote_code))
        elif a.cmd == "count":
            answer = _answer(lambda: count(_roles(a.role), a.tokenizer, a.seq_len, a.text_field, a.column))
        else:
            answer = _answer(lambda: read_source(a.source, a.text_field, a.column, a.n, a.chars))
    real_stdout.write(json.dumps(answer, default=str) + "\n")
    real_stdout.flush()
    return 0 if answer.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main())
