"""The forget-set builder: pick sources (files, folders, globs from a tree or typed, `hf:` references),
give each a role, see their documents, count them, and save the set under a name.

Saving runs the code of `unlearn forgetset create` (studies.store.forgetsets.create_forget_set). It runs
here when that reads only local files without a tokenizer (engine.data's readers import no training
library); with a tokenizer or an `hf:` source it would import transformers or datasets, so it runs
as `python -m tui.cli forgetset create ... --json` in a subprocess, the store URL in its environment.
Document counts and previews are read in a thread worker (hf: sources through studies.running.probe);
tokens and chunks always come from studies.running.probe in a subprocess.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, DirectoryTree, Footer, Input, Label, Select, Static
from textual.worker import get_current_worker

from engine.data import RETAIN_EVAL_SHARE, ROLES, DataError, ForgetSetTexts, hold_out_retain_eval
from engine.errors import UnlearnError
from studies.running.probe import count_tokens, needs_child, source_summary
from studies.store.db import Store
from studies.store.forgetsets import check_name

REQUIRED_ROLES = ("forget", "retain", "unseen")  # general is optional; retain_eval is held out of retain if not given
FIELD_DEBOUNCE_S = 0.5


@dataclass
class Source:
    spec: str
    role: str


@dataclass(frozen=True)
class SaveForm:
    """What the user asked to save, read from the widgets once (workers never touch widgets)."""

    name: str
    sources: dict[str, list[str]]  # role -> specs
    text_field: str
    column: str | None
    seq_len: int
    tokenizer: str | None


class SourceRead(Message):
    """One source's documents and preview (or its error), read with these field settings."""

    def __init__(self, spec: str, fields: tuple[str, str | None], answer: dict) -> None:
        super().__init__()
        self.spec, self.fields, self.answer = spec, fields, answer


class TokensCounted(Message):
    def __init__(self, key: tuple, answer: dict) -> None:
        super().__init__()
        self.key, self.answer = key, answer


class SaveFinished(Message):
    """`field` says where an error belongs ("name" or "save"); `answer` is describe()'s dict on success."""

    def __init__(self, name: str, answer: dict | None, error: str | None = None, field: str = "save") -> None:
        super().__init__()
        self.name, self.answer, self.error, self.field = name, answer, error, field


class SourceTable(DataTable):
    """The chosen sources. r: next role; delete or x: remove."""

    BINDINGS = [Binding("r", "cycle_role", "Next role"), Binding("delete,x", "remove", "Remove")]

    class CycleRole(Message):
        def __init__(self, spec: str) -> None:
            super().__init__()
            self.spec = spec

    class Remove(Message):
        def __init__(self, spec: str) -> None:
            super().__init__()
            self.spec = spec

    def highlighted_spec(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def action_cycle_role(self) -> None:
        if (spec := self.highlighted_spec()) is not None:
            self.post_message(self.CycleRole(spec))

    def action_remove(self) -> None:
        if (spec := self.highlighted_spec()) is not None:
            self.post_message(self.Remove(spec))


class ForgetSetBuilderScreen(Screen[str | None]):
    """Build and save a forget set; dismisses with its name, or None (escape).

    Keys: escape goes back; ctrl+s saves; in the source list r changes a source's role and
    delete (or x) removes it; enter on a file or folder of the tree puts it in the path field."""

    BINDINGS = [Binding("escape", "back", "Back"), Binding("ctrl+s", "save", "Save")]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]

    DEFAULT_CSS = """
    ForgetSetBuilderScreen #builder-body { padding: 0 1; }
    ForgetSetBuilderScreen .title { text-style: bold; margin-bottom: 1; }
    ForgetSetBuilderScreen #builder-top { height: auto; }
    ForgetSetBuilderScreen.-narrow #builder-top { layout: vertical; }
    ForgetSetBuilderScreen #tree { height: 12; min-width: 30; }
    ForgetSetBuilderScreen.-wide #tree { width: 1fr; height: 16; }
    ForgetSetBuilderScreen #add-pane { height: auto; }
    ForgetSetBuilderScreen.-wide #add-pane { width: 1fr; padding-left: 1; }
    ForgetSetBuilderScreen .row { height: auto; }
    ForgetSetBuilderScreen .row > Label { width: 13; padding: 1 1 0 0; }
    ForgetSetBuilderScreen .row > Input { width: 1fr; }
    ForgetSetBuilderScreen #role { width: 19; }  /* the longest role, retain_eval, whole */
    ForgetSetBuilderScreen #seq-len { width: 12; }
    ForgetSetBuilderScreen .error { width: 1fr; padding: 0 1; }
    ForgetSetBuilderScreen .error.-empty { display: none; }
    ForgetSetBuilderScreen .error.-busy { background: transparent; color: $text-muted; }
    ForgetSetBuilderScreen .hint { color: $text-muted; height: auto; width: 1fr; }
    ForgetSetBuilderScreen #sources { height: auto; max-height: 10; margin-top: 1; }
    ForgetSetBuilderScreen #preview-box { height: auto; max-height: 14; border: round $primary-darken-2; }
    ForgetSetBuilderScreen #preview { height: auto; }
    ForgetSetBuilderScreen #counts { height: auto; margin: 1 0; }
    ForgetSetBuilderScreen #saved { color: $success; height: auto; }
    """

    def __init__(self, store: Store, root: str | Path = ".") -> None:
        super().__init__()
        self.store = store
        self.root = Path(root).expanduser().resolve()
        self.sources: list[Source] = []
        self.readings: dict[str, dict] = {}  # spec -> source_summary answer, for the current fields
        self.token_answer: dict | None = None  # the last count's answer, for self._token_key()
        self.token_key: tuple | None = None
        self.saved_hash: str | None = None
        self._field_timer = None

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with VerticalScroll(id="builder-body"):
            yield Label("New forget set", classes="title")
            with Horizontal(id="builder-top"):
                yield DirectoryTree(self.root, id="tree")
                with Vertical(id="add-pane"):
                    yield Label("enter on a file or folder of the tree puts it in the source field; "
                                "hf:NAME[:CONFIG]/SPLIT[#col] reads a Hugging Face dataset", classes="hint")
                    with Horizontal(classes="row"):
                        yield Label("source")
                        yield Input(placeholder="file, folder, glob or hf:NAME/SPLIT", id="source-input")
                    with Horizontal(classes="row"):
                        yield Label("role")
                        yield Select([(r, r) for r in ROLES], value="forget", allow_blank=False, id="role")
                        yield Button("Add", id="add", variant="primary")
                    yield Label("", id="source-error", classes="error -empty")
                    with Horizontal(classes="row"):
                        yield Label("text field")
                        yield Input("text", placeholder="field of .jsonl/.json rows", id="text-field")
                    with Horizontal(classes="row"):
                        yield Label("column")
                        yield Input(placeholder="column of .csv/.parquet (default: the text field)", id="column")
                    yield Label("", id="field-error", classes="error -empty")
            yield SourceTable(id="sources", cursor_type="row", zebra_stripes=True)
            yield Label("r: next role · x: remove", classes="hint")
            with VerticalScroll(id="preview-box"):
                yield Static("add a source to see its documents", id="preview")
            yield Static("", id="counts")
            with Horizontal(classes="row"):
                yield Label("tokenizer")
                yield Input(placeholder="tokenizer or model folder / hub id (for tokens and chunks)", id="tokenizer")
                yield Input("512", placeholder="seq_len", id="seq-len", type="integer")
                yield Button("Count tokens", id="count-tokens")
            yield Label("", id="tokens-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("name")
                yield Input(placeholder="a new name: letters, digits, _ . -", id="name")
                yield Button("Save", id="save", variant="success")
            yield Label("", id="name-error", classes="error -empty")
            yield Label("", id="save-error", classes="error -empty")
            yield Label("", id="saved")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(SourceTable)
        table.add_column("role", key="role", width=max(map(len, ROLES)))
        table.add_column("source", key="source")
        table.add_column("documents", key="docs", width=24)
        self._show_counts()
        self.query_one("#source-input", Input).focus()

    # ------------------------------------------------------------------ small helpers
    def _error(self, where: str, text: str = "", busy: bool = False) -> None:
        """One line beside the field (busy: a note that work is under way, not an error)."""
        label = self.query_one(f"#{where}-error", Label)
        label.update(Text(text))
        label.set_class(not text, "-empty")
        label.set_class(busy, "-busy")

    def _value(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    def _fields(self) -> tuple[str, str | None]:
        return self._value("#text-field") or "text", self._value("#column") or None

    def _by_role(self) -> dict[str, list[str]]:
        return {r: [s.spec for s in self.sources if s.role == r] for r in ROLES}

    def _token_key(self) -> tuple:
        return (tuple((s.spec, s.role) for s in self.sources), self._fields(), self._value("#tokenizer"),
                self._value("#seq-len"))

    # ------------------------------------------------------------------ adding sources
    @on(DirectoryTree.DirectorySelected)
    def _folder_picked(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#source-input", Input).value = str(event.path)  # the tree keeps focus: it may go inside

    @on(DirectoryTree.FileSelected)
    def _file_picked(self, event: DirectoryTree.FileSelected) -> None:
        field = self.query_one("#source-input", Input)
        field.value = str(event.path)
        field.focus()  # enter again adds it in the chosen role

    @on(Input.Submitted, "#source-input")
    @on(Button.Pressed, "#add")
    def _add_typed(self) -> None:
        role = self.query_one("#role", Select).value
        self.add_source(self._value("#source-input"), str(role))

    def add_source(self, spec: str, role: str) -> bool:
        """Add one source in a role; a problem shows beside the path field and nothing is added."""
        problem = self._source_problem(spec)
        if problem:
            self._error("source", problem)
            return False
        self._error("source")
        self.sources.append(Source(spec, role))
        self.query_one(SourceTable).add_row(role, spec, "reading…", key=spec)
        self.query_one("#source-input", Input).value = ""
        table = self.query_one(SourceTable)
        table.move_cursor(row=table.row_count - 1)
        self._sources_changed()
        return True

    def _source_problem(self, spec: str) -> str | None:
        if not spec:
            return "type a file, folder, glob or hf:NAME/SPLIT (or pick one in the tree)"
        if any(s.spec == spec for s in self.sources):
            role = next(s.role for s in self.sources if s.spec == spec)
            return f"{spec} is already a {role} source"
        if spec.startswith("hf:"):
            body = spec[3:].partition("#")[0]
            name, slash, split = body.rpartition("/")
            return None if slash and name and split else f"{spec}: expected hf:NAME[:CONFIG]/SPLIT[#column]"
        path = os.path.expanduser(spec)
        if not os.path.exists(path) and not glob.has_magic(path):  # a glob is checked when it is read
            return f"no such file or folder: {spec}"
        return None

    @on(SourceTable.CycleRole)
    def _cycle_role(self, event: SourceTable.CycleRole) -> None:
        source = next(s for s in self.sources if s.spec == event.spec)
        source.role = ROLES[(ROLES.index(source.role) + 1) % len(ROLES)]
        self.query_one(SourceTable).update_cell(event.spec, "role", source.role)
        self._sources_changed()

    @on(SourceTable.Remove)
    def _remove(self, event: SourceTable.Remove) -> None:
        self.sources = [s for s in self.sources if s.spec != event.spec]
        self.readings.pop(event.spec, None)
        self.query_one(SourceTable).remove_row(event.spec)
        self._sources_changed()
        self._show_preview()

    def _sources_changed(self) -> None:
        self._error("save")
        self._show_counts()
        self._read_missing()

    # ------------------------------------------------------------------ reading documents
    @on(Input.Changed, "#text-field, #column")
    def _fields_edited(self) -> None:
        if self._field_timer is not None:
            self._field_timer.stop()
        self._field_timer = self.set_timer(FIELD_DEBOUNCE_S, self._fields_changed)

    def _fields_changed(self) -> None:
        self._field_timer = None
        self._error("field", "" if self._value("#text-field") else "the text field is empty: reading 'text'")
        self.readings.clear()
        table = self.query_one(SourceTable)
        for s in self.sources:
            table.update_cell(s.spec, "docs", "reading…")
        self._show_counts()
        self._show_preview()
        self._read_missing()

    def _read_missing(self) -> None:
        todo = [s.spec for s in self.sources if s.spec not in self.readings]
        if todo:
            self.read_sources(todo, self._fields())

    @work(thread=True, exclusive=True, name="read sources", group="builder-read")
    def read_sources(self, specs: list[str], fields: tuple[str, str | None]) -> None:
        worker = get_current_worker()
        for spec in specs:
            if worker.is_cancelled:
                return
            answer = source_summary(spec, fields[0], fields[1], should_stop=lambda: worker.is_cancelled)
            if answer.get("stopped"):
                return
            self.post_message(SourceRead(spec, fields, answer))

    @on(SourceRead)
    def _source_read(self, event: SourceRead) -> None:
        if event.fields != self._fields() or not any(s.spec == event.spec for s in self.sources):
            return  # read with settings or sources that have changed since
        self.readings[event.spec] = event.answer
        a = event.answer
        cell = Text(f"{a['documents']}") if a.get("ok") else Text(f"✗ {a.get('error', '')}", style="red")
        self.query_one(SourceTable).update_cell(event.spec, "docs", cell)
        self._show_counts()
        if self._highlighted() == event.spec:
            self._show_preview()

    # ------------------------------------------------------------------ preview and counts
    def _highlighted(self) -> str | None:
        return self.query_one(SourceTable).highlighted_spec()

    @on(DataTable.RowHighlighted, "#sources")
    def _row_highlighted(self) -> None:
        self._show_preview()

    def _show_preview(self) -> None:
        preview = self.query_one("#preview", Static)
        spec = self._highlighted()
        if spec is None:
            preview.update("add a source to see its documents")
            return
        a = self.readings.get(spec)
        if a is None:
            preview.update(Text(f"{spec}: reading…", style="dim"))
        elif not a.get("ok"):
            preview.update(Text(f"{spec}: {a.get('error')}", style="red"))
        else:
            out = Text.assemble((f"{spec}: {a['documents']} documents", "bold"), f"; the first {len(a['preview'])}\n")
            for i, doc in enumerate(a["preview"], 1):
                out.append(f"── {i} ", style="dim").append("─" * 20 + "\n", style="dim").append(doc + "\n")
            preview.update(out)

    def doc_counts(self) -> dict[str, int | None]:
        """Documents per role as read so far (None while a source of it is unread or failed)."""
        counts: dict[str, int | None] = {}
        for role, specs in self._by_role().items():
            answers = [self.readings.get(s) for s in specs]
            ok = all(a is not None and a.get("ok") for a in answers)
            counts[role] = sum(a["documents"] for a in answers) if ok else None
        return counts

    def _show_counts(self) -> None:
        t = Table(box=None, header_style="bold", pad_edge=False)
        for col, justify in (("role", "left"), ("sources", "right"), ("documents", "right"), ("tokens", "right"),
                             ("chunks", "right")):
            t.add_column(col, justify=justify)
        fresh = self.token_answer if self.token_key == self._token_key() else None
        by_role, docs = self._by_role(), self.doc_counts()
        for role in ROLES:
            tok = ((fresh or {}).get("roles") or {}).get(role) or {}
            n = docs[role]
            t.add_row(role, str(len(by_role[role])), "—" if not by_role[role] else "…" if n is None else str(n),
                      _num(tok.get("tokens")), _num(tok.get("chunks")))
        note = self.held_out_note()
        self.query_one("#counts", Static).update(Group(t, note) if note is not None else t)

    def held_out_note(self) -> Text | None:
        """What saving will do without a retain_eval source: hold out a seeded share of the retain
        documents (engine.data.hold_out_retain_eval), or refuse a retain set too small for it."""
        by_role, docs = self._by_role(), self.doc_counts()
        n = docs["retain"]
        if by_role["retain_eval"] or not by_role["retain"] or n is None:
            return None
        try:
            k = retain_eval_held_out(n)
        except DataError:
            return Text(f"no retain_eval source and {n} retain document{'s' if n != 1 else ''}: holding out "
                        "retain_eval needs at least 2 (or add a retain_eval source)", style="red")
        return Text(f"no retain_eval source: {k} of the {n} retain documents (a seeded {RETAIN_EVAL_SHARE:.0%}) are "
                    "held out as retain_eval, where utility is measured; no retain term trains on them", style="dim")

    # ------------------------------------------------------------------ tokens and chunks
    @on(Input.Changed, "#tokenizer, #seq-len")
    def _token_inputs_edited(self) -> None:
        self._error("tokens")
        self._show_counts()

    @on(Input.Submitted, "#tokenizer, #seq-len")
    @on(Button.Pressed, "#count-tokens")
    def action_count_tokens(self) -> None:
        tokenizer, seq_len = self._value("#tokenizer"), self._seq_len("tokens")
        if seq_len is None:
            return
        if not tokenizer:
            self._error("tokens", "type a tokenizer or model path to count tokens and chunks")
            return
        if not self.sources:
            self._error("tokens", "add a source first")
            return
        self._error("tokens", "counting…", busy=True)
        self.count_tokens_worker(self._token_key(), self._by_role(), tokenizer, seq_len, self._fields())

    def _seq_len(self, where: str) -> int | None:
        try:
            n = int(self._value("#seq-len"))
        except ValueError:
            self._error(where, "seq_len must be a whole number (tokens per chunk)")
            return None
        if n < 16:
            self._error(where, "seq_len must be at least 16")
            return None
        return n

    @work(thread=True, exclusive=True, name="count tokens", group="builder-tokens")
    def count_tokens_worker(self, key: tuple, roles: dict[str, list[str]], tokenizer: str, seq_len: int,
                            fields: tuple[str, str | None]) -> None:
        worker = get_current_worker()
        roles = {r: specs for r, specs in roles.items() if specs}
        answer = count_tokens(roles, tokenizer, seq_len, fields[0], fields[1], should_stop=lambda: worker.is_cancelled)
        if not answer.get("stopped"):
            self.post_message(TokensCounted(key, answer))

    @on(TokensCounted)
    def _tokens_counted(self, event: TokensCounted) -> None:
        if event.key != self._token_key():  # counted for sources or settings changed since
            self._error("tokens")
            return
        self.token_key, self.token_answer = event.key, event.answer
        self._error("tokens", "" if event.answer.get("ok") else event.answer.get("error", "the count failed"))
        self._show_counts()

    # ------------------------------------------------------------------ saving
    @on(Input.Submitted, "#name")
    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        form = self._save_form()
        if form is not None:
            self._error("save", "saving…", busy=True)
            self.save_worker(form)

    def _save_form(self) -> SaveForm | None:
        """The form, or None with every problem shown beside its field."""
        ok = True
        name = self._value("#name")
        try:
            check_name(name, "forget set")
            self._error("name")
        except UnlearnError as e:
            self._error("name", str(e))
            ok = False
        seq_len = self._seq_len("save")
        if seq_len is None:
            return None
        by_role = self._by_role()
        empty = [r for r in REQUIRED_ROLES if not by_role[r]]
        failed = [(s, a) for s in self.sources if (a := self.readings.get(s.spec)) and not a.get("ok")]
        if empty:
            self._error("save", f"the {empty[0]} set is empty: add at least one {empty[0]} source")
            return None
        if failed:
            source, answer = failed[0]
            self._error("save", f"{source.role}: {answer.get('error')}")
            return None
        if not ok:
            self._error("save")
            return None
        text_field, column = self._fields()
        return SaveForm(name, by_role, text_field, column, seq_len, self._value("#tokenizer") or None)

    @work(thread=True, exclusive=True, name="save forget set", group="builder-save")
    def save_worker(self, form: SaveForm) -> None:
        worker = get_current_worker()
        try:
            self.store.forget_set(form.name)
            self.post_message(SaveFinished(form.name, None, f"a forget set named {form.name!r} already exists "
                                                             "(forget sets are immutable; pick a new name)", "name"))
            return
        except UnlearnError:
            pass  # the name is free
        except Exception as e:
            self.post_message(SaveFinished(form.name, None, _one_line(e)))
            return
        if form.tokenizer or any(needs_child(s) for specs in form.sources.values() for s in specs):
            answer, error = save_in_subprocess(self.store, form, lambda: worker.is_cancelled)
        else:
            answer, error = save_here(self.store, form)
        if worker.is_cancelled:
            return
        field = "name" if error and ("forget set name" in error or "already exists" in error) else "save"
        self.post_message(SaveFinished(form.name, answer, error, field))

    @on(SaveFinished)
    def _save_finished(self, event: SaveFinished) -> None:
        if event.error:
            self._error("save", "" if event.field == "name" else event.error)
            if event.field == "name":
                self._error("name", event.error)
            return
        self._error("save")
        self.saved_hash = event.answer["hash"]
        line = f"saved forget set {event.name} · sha256 {self.saved_hash}"
        self.query_one("#saved", Label).update(line)
        self.notify(f"forget set {event.name} saved · {self.saved_hash[:12]}", title="forget set")
        self.dismiss(event.name)

    def action_back(self) -> None:
        self.dismiss(None)


def save_here(store: Store, form: SaveForm) -> tuple[dict | None, str | None]:
    """create_forget_set in this process (local sources, no tokenizer: nothing heavy is imported)."""
    from studies.store.forgetsets import create_forget_set, describe

    try:
        fs = create_forget_set(store, form.name, form.sources["forget"], form.sources["retain"],
                               form.sources["unseen"], form.sources["general"] or None, form.text_field, form.column,
                               form.seq_len, None, retain_eval=form.sources["retain_eval"] or None)
    except UnlearnError as e:
        return None, str(e)
    except Exception as e:  # a store error: one line, never a traceback
        return None, _one_line(e)
    return describe(fs), None


def save_in_subprocess(store: Store, form: SaveForm, should_stop) -> tuple[dict | None, str | None]:
    """`unlearn forgetset create ... --json` in a child, its store URL in the environment."""
    from studies.running.pool import child_env

    args = [sys.executable, "-m", "tui.cli", "forgetset", "create", form.name]
    for role in ROLES:
        args += [f"--{role.replace('_', '-')}={spec}" for spec in form.sources[role]]
    args += [f"--seq-len={form.seq_len}", f"--text-field={form.text_field}", "--json"]
    if form.column:
        args.append(f"--column={form.column}")
    if form.tokenizer:
        args.append(f"--tokenizer={form.tokenizer}")
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, env={**child_env(store), "TOKENIZERS_PARALLELISM": "false"})
    except OSError as e:
        return None, f"cannot start `unlearn forgetset create`: {e}"
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if should_stop():  # the screen is gone; the insert is one transaction, so nothing is half saved
                proc.kill()
                proc.communicate()
                return None, "stopped"
    if proc.returncode == 0:
        try:
            return json.loads(out), None
        except json.JSONDecodeError:
            return None, "`unlearn forgetset create` printed no JSON"
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    return None, (lines[-1].removeprefix("error: ") if lines else f"`unlearn forgetset create` exited with {proc.returncode}")


def retain_eval_held_out(n: int) -> int:
    """How many of n retain documents saving holds out as retain_eval when no retain_eval source is
    given (the engine's own split, on placeholders); DataError where n is too small."""
    placeholders = ForgetSetTexts(forget=[], retain=[""] * n, unseen=[], general=[], sources={})
    return len(hold_out_retain_eval(placeholders, RETAIN_EVAL_SHARE).retain_eval)


def _num(n) -> str:
    return "—" if n is None else f"{n:,}"


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")

