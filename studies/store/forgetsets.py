"""Forget sets in the store: named, immutable, identified by content hash, texts kept inside."""
from __future__ import annotations

import json
import os
import re

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from engine.data import RETAIN_EVAL_SHARE, ROLES, ForgetSetTexts, chunk_forget_set, load_forget_set
from engine.errors import UnlearnError
from studies.store.db import Document, ForgetSet, Store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UnlearnError(f"{what} name {name!r}: use letters, digits, '_', '.', '-' (up to 128, starting alphanumeric)")
    return name


def create_forget_set(store: Store, name: str, forget: list[str], retain: list[str], unseen: list[str],
                      general: list[str] | None = None, text_field: str = "text", column: str | None = None,
                      seq_len: int = 512, tokenizer: str | None = None,
                      prompt_field: str | None = None, answer_field: str | None = None,
                      retain_eval: list[str] | None = None, retain_eval_share: float = RETAIN_EVAL_SHARE) -> ForgetSet:
    """Read every source, hash the texts, optionally count chunks, and store it all in one transaction.
    With `prompt_field` and `answer_field` every source is question–answer rows (see engine.data).
    Without `retain_eval` sources, a seeded `retain_eval_share` of retain is held out as retain_eval."""
    check_new_name(store, name, seq_len)
    forget, retain, unseen, general, retain_eval = (_absolute(x or []) for x in (forget, retain, unseen, general,
                                                                                   retain_eval))
    texts = load_forget_set(forget, retain, unseen, general, text_field=text_field, column=column,
                            prompt_field=prompt_field, answer_field=answer_field, retain_eval=retain_eval,
                            retain_eval_share=retain_eval_share)
    meta = {"qa": {"prompt_field": prompt_field, "answer_field": answer_field}} if prompt_field else {}
    if not retain_eval:  # held out of retain: how, so the split can be told and redone
        meta["retain_eval"] = {"held_out_share": retain_eval_share, "seed": 0}
    meta = meta or None
    return store_forget_set(store, name, texts, text_field=text_field, column=column, seq_len=seq_len,
                            tokenizer=tokenizer, meta=meta)


def check_new_name(store: Store, name: str, seq_len: int) -> None:
    """Refuse, before any source is read, a bad name, one taken, or a seq_len too short."""
    check_name(name, "forget set")
    if seq_len < 16:
        raise UnlearnError("--seq-len must be at least 16")
    with store.read() as s:
        if s.exec(select(ForgetSet).where(ForgetSet.name == name)).first():
            raise UnlearnError(f"a forget set named {name!r} already exists (forget sets are immutable; pick a new name)")


def store_forget_set(store: Store, name: str, texts: ForgetSetTexts, *, text_field: str = "text",
                     column: str | None = None, seq_len: int = 512, tokenizer: str | None = None,
                     meta: dict | None = None, extras: dict[str, list[dict]] | None = None) -> ForgetSet:
    """Store loaded texts as the forget set `name`, with a benchmark's evaluation rows (`extras`:
    name -> JSON rows, kept as documents of role "extra:NAME"; see forget_set_extras)."""
    chunks = None
    if tokenizer:
        from engine.models import load_tokenizer

        sets = chunk_forget_set(texts, load_tokenizer(tokenizer), seq_len)
        chunks = {role: len(ch) for role, ch in sets.items()}
    if extras:
        meta = {**(meta or {}), "extras": {k: len(v) for k, v in extras.items()}}
    row = ForgetSet(name=name, hash=texts.hash, sources={r: list(texts.sources.get(r, [])) for r in ROLES},
                    text_field=text_field, column=column, seq_len=seq_len, tokenizer=tokenizer, counts=texts.counts(),
                    chunks=chunks, meta=meta)
    try:
        _insert(store, row, texts, extras or {})
    except IntegrityError:  # another process created the same name between our check and insert
        raise UnlearnError(f"a forget set named {name!r} already exists (forget sets are immutable; pick a new name)") from None
    return row


EXTRA_ROLE = "extra:"


def _insert(store: Store, row: ForgetSet, texts: ForgetSetTexts, extras: dict[str, list[dict]]) -> None:
    with store.write() as s:
        s.add(row)
        s.flush()
        for role in ROLES:
            for i, (text, prompt) in enumerate(zip(getattr(texts, role), texts.prompts_of(role))):
                s.add(Document(forgetset_id=row.id, role=role, position=i, text=text, prompt=prompt))
        for name, rows in extras.items():
            for i, r in enumerate(rows):
                s.add(Document(forgetset_id=row.id, role=EXTRA_ROLE + name, position=i,
                               text=json.dumps(r, ensure_ascii=False, sort_keys=True)))


def _absolute(specs: list[str]) -> list[str]:
    """Local sources as absolute paths, so an exported command works from any directory."""
    return [s if s.startswith("hf:") else os.path.abspath(os.path.expanduser(s)) for s in specs]


def forget_set_texts(store: Store, fs: ForgetSet) -> ForgetSetTexts:
    """The stored texts, checked against the stored hash (a damaged store is refused, not used), with
    the set's extras (a preset's evaluation rows), so a worker rebuilds a run from the store alone."""
    by_role: dict[str, list[str]] = {r: [] for r in ROLES}
    prompts: dict[str, list[str | None]] = {r: [] for r in ROLES}
    with store.read() as s:
        docs = s.exec(select(Document).where(Document.forgetset_id == fs.id, Document.role.in_(ROLES))
                      .order_by(Document.role, Document.position)).all()
    for d in docs:
        by_role[d.role].append(d.text)
        prompts[d.role].append(d.prompt)
    qa = any(p is not None for ps in prompts.values() for p in ps)
    texts = ForgetSetTexts(sources=fs.sources, **by_role, prompts=prompts if qa else {},
                           extras=forget_set_extras(store, fs) if (fs.meta or {}).get("extras") else {})
    if texts.hash != fs.hash:
        raise UnlearnError(f"forget set {fs.name!r}: stored texts do not match its hash {fs.hash[:12]}")
    return texts


def forget_set_extras(store: Store, fs: ForgetSet) -> dict[str, list[dict]]:
    """A benchmark preset's evaluation rows, name -> rows in order (TOFU's perturbed and paraphrased
    answers, MUSE's knowmem QA and verbmem prompts: see docs/data.md); {} for any other set."""
    out: dict[str, list[dict]] = {}
    with store.read() as s:
        docs = s.exec(select(Document).where(Document.forgetset_id == fs.id, Document.role.startswith(EXTRA_ROLE))
                      .order_by(Document.role, Document.position)).all()
    for d in docs:
        out.setdefault(d.role[len(EXTRA_ROLE):], []).append(json.loads(d.text))
    return out


def list_forget_sets(store: Store) -> list[ForgetSet]:
    with store.read() as s:
        return list(s.exec(select(ForgetSet).order_by(ForgetSet.created_at)).all())


def describe(fs: ForgetSet) -> dict:
    return {"name": fs.name, "hash": fs.hash, "sources": fs.sources, "documents": fs.counts, "chunks": fs.chunks,
            "seq_len": fs.seq_len, "tokenizer": fs.tokenizer, "text_field": fs.text_field,
            "meta": fs.meta, "created_at": fs.created_at.isoformat()}
