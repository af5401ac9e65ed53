"""Forget sets in the store: named, immutable, identified by content hash, texts kept inside."""
from __future__ import annotations

import os
import re

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from engine.data import ROLES, ForgetSetTexts, chunk_forget_set, load_forget_set
from engine.errors import UnlearnError
from studies.store import Document, ForgetSet, Store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UnlearnError(f"{what} name {name!r}: use letters, digits, '_', '.', '-' (up to 128, starting alphanumeric)")
    return name


def create_forget_set(store: Store, name: str, forget: list[str], retain: list[str], unseen: list[str],
                      general: list[str] | None = None, text_field: str = "text", column: str | None = None,
                      seq_len: int = 512, tokenizer: str | None = None) -> ForgetSet:
    """Read every source, hash the texts, optionally count chunks, and store it all in one transaction."""
    check_name(name, "forget set")
    if seq_len < 16:
        raise UnlearnError("--seq-len must be at least 16")
    with store.read() as s:
        if s.exec(select(ForgetSet).where(ForgetSet.name == name)).first():
            raise UnlearnError(f"a forget set named {name!r} already exists (forget sets are immutable; pick a new name)")
    forget, retain, unseen, general = (_absolute(x or []) for x in (forget, retain, unseen, general))
    texts = load_forget_set(forget, retain, unseen, general, text_field=text_field, column=column)
    chunks = None
    if tokenizer:
        from engine.models import load_tokenizer

        sets = chunk_forget_set(texts, load_tokenizer(tokenizer), seq_len)
        chunks = {role: len(ch) for role, ch in sets.items()}
    row = ForgetSet(name=name, hash=texts.hash, sources={r: list(texts.sources.get(r, [])) for r in ROLES},
                    text_field=text_field, column=column, seq_len=seq_len, tokenizer=tokenizer, counts=texts.counts(), chunks=chunks)
    try:
        _insert(store, row, texts)
    except IntegrityError:  # another process created the same name between our check and insert
        raise UnlearnError(f"a forget set named {name!r} already exists (forget sets are immutable; pick a new name)") from None
    return row


def _insert(store: Store, row: ForgetSet, texts: ForgetSetTexts) -> None:
    with store.write() as s:
        s.add(row)
        s.flush()
        for role in ROLES:
            for i, text in enumerate(getattr(texts, role)):
                s.add(Document(forgetset_id=row.id, role=role, position=i, text=text))


def _absolute(specs: list[str]) -> list[str]:
    """Local sources as absolute paths, so an exported command works from any directory."""
    return [s if s.startswith("hf:") else os.path.abspath(os.path.expanduser(s)) for s in specs]


def forget_set_texts(store: Store, fs: ForgetSet) -> ForgetSetTexts:
    """The stored texts, checked against the stored hash (a damaged store is refused, not used)."""
    by_role: dict[str, list[str]] = {r: [] for r in ROLES}
    with store.read() as s:
        docs = s.exec(select(Document).where(Document.forgetset_id == fs.id).order_by(Document.role, Document.position)).all()
    for d in docs:
        by_role[d.role].append(d.text)
    texts = ForgetSetTexts(sources=fs.sources, **by_role)
    if texts.hash != fs.hash:
        raise UnlearnError(f"forget set {fs.name!r}: stored texts do not match its hash {fs.hash[:12]}")
    return texts


def list_forget_sets(store: Store) -> list[ForgetSet]:
    with store.read() as s:
        return list(s.exec(select(ForgetSet).order_by(ForgetSet.created_at)).all())


def describe(fs: ForgetSet) -> dict:
    return {"name": fs.name, "hash": fs.hash, "sources": fs.sources, "documents": fs.counts, "chunks": fs.chunks,
            "seq_len": fs.seq_len, "tokenizer": fs.tokenizer, "text_field": fs.text_field,
            "created_at": fs.created_at.isoformat()}
