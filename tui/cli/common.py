"""What the commands share: the `--storage` option (declared here once), the settings and store it
resolves to, and the run-settings options that `unlearn run` and `unlearn study create` derive
from `engine.config.RunSettings`.

Imports nothing heavy: every read-only command goes through here (the light read path)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from engine.config import settings_fields
from studies.lifecycle.inputs import setting_default_text, setting_type

if TYPE_CHECKING:
    from studies.settings import LabSettings
    from studies.store.db import Store

STORAGE_HELP = ("SQLAlchemy URL of the store (default: $UNLEARN_STORAGE_URL, then .env, then sqlite:///unlearn.db). "
                "Put a password in UNLEARN_STORAGE_URL or .env, not on the command line")


class Lab:
    """What a command needs from outside itself, resolved once per invocation: the lab's settings
    (flags, then UNLEARN_* variables, then .env) and the store they name. Built here rather than
    taken from studies.settings.lab_settings(): a flag is one more layer, and the tests run many
    invocations in one process."""

    def __init__(self) -> None:
        self.storage_flag: Optional[str] = None
        self._settings: Optional[LabSettings] = None

    @property
    def settings(self) -> LabSettings:
        if self._settings is None:
            from studies.settings import LabSettings

            given = {"storage_url": self.storage_flag} if self.storage_flag else {}
            self._settings = LabSettings(**given)
        return self._settings

    @property
    def storage_url(self) -> str:
        """The store's URL. A flag or UNLEARN_STORAGE_URL decides it alone (flags first, then the
        environment), so a quick read need not import pydantic-settings to learn it; otherwise the
        settings read `.env` and the default."""
        return self.storage_flag or os.environ.get("UNLEARN_STORAGE_URL") or self.settings.storage_url

    def store(self, create: bool = False) -> Store:
        """The store; `create` only for commands that may start a new one (`forgetset create`)."""
        from studies.store.db import Store

        return Store(self.settings.storage_url, create=create)


def lab(ctx: typer.Context) -> Lab:
    root = ctx.find_root()
    if not isinstance(root.obj, Lab):
        root.obj = Lab()
    return root.obj


def _take_storage(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    if value:
        lab(ctx).storage_flag = value
    return value


# The one declaration of --storage: a command that reads or writes the store takes
# `storage: Storage = None` (and `ctx: typer.Context`) and asks `lab(ctx).store()` for it.
Storage = Annotated[Optional[str], typer.Option("--storage", help=STORAGE_HELP, callback=_take_storage,
                                                show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="print JSON on stdout (and nothing else there)")]


def with_declared_options(func, into: str, prefix: str, options: list[tuple[str, object, object]], given):
    """`func` as a Typer command with one more keyword option per (name, annotation, typer.Option)
    of `options` (a declaration's fields: RunSettings, SLURM_FIELDS; Click knows each as
    `prefix + name`), handing it `into`=given(values), {name: value as typed} -> what the command
    receives. One mechanism for every such family."""
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != into]
    extra = [inspect.Parameter(f"{prefix}{name}", inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)
             for name, annotation, option in options]

    @functools.wraps(func)
    def command(*args, **kwargs):
        values = {name: kwargs.pop(f"{prefix}{name}") for name, _, _ in options}
        return func(*args, **{into: given(values)}, **kwargs)

    command.__signature__ = sig.replace(parameters=params + extra)
    command.__annotations__ = {p.name: p.annotation for p in params + extra}
    return command


def run_settings_options(func):
    """Give a Typer command one option per RunSettings field (flag and help from the field's
    metadata), and hand it `given_settings`: a dict of the ones given on the command line.

    The command decides what an absent flag means (the RunSettings default for `unlearn run`; for
    `study create` the forget set's own seq_len), which is why absent flags are not filled in here."""
    options = []
    for f in settings_fields():
        kind = setting_type(f)  # the app's advanced fields convert with the same type
        help_text = f.metadata["help"]
        options.append((f.name, Optional[kind], typer.Option(
            None, f.metadata["flag"], show_default=False,
            help=help_text if kind is bool else f"{help_text}  [default: {setting_default_text(f)}]")))
    return with_declared_options(func, "given_settings", "rs_", options,
                                 lambda values: {k: v for k, v in values.items() if v is not None})




@contextlib.contextmanager
def sigterm_as_exit():
    """Within it, SIGTERM (the app's Cancel, `kill`, a batch system's stop) raises SystemExit(143)
    instead of ending the process outright, so the work's own cleanup runs: a model folder half
    written by `export --save-model` is removed, not left behind (gigabytes)."""
    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
