"""`unlearn`: the command line, assembled. Every command lives in its module of tui/cli/; this file only puts
them together and owns the contract every command shares: --json puts only JSON on stdout,
progress goes to stderr, and bad input is one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import os
import sys

import typer

from engine.errors import UnlearnError
from tui.cli import demo, forgetset, plan, report, run, study
from tui.cli import tui as tui_cmd
from tui.cli.console import err, out

try:  # typer ≥ 0.16 vendors its own click; catch the usage errors of both
    from typer._click import exceptions as _tclick
except ImportError:  # pragma: no cover
    import click.exceptions as _tclick
import click

USAGE_ERRORS = (click.exceptions.UsageError, _tclick.UsageError)
ABORTS = (click.exceptions.Abort, typer.Abort)
EXITS = (click.exceptions.Exit, typer.Exit)


def _group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None)


app = _group("unlearn-lab: machine unlearning of pre-trained LLMs — methods, runs, studies over lr × steps.")
app.command("methods")(run.methods_cmd)
app.command("run")(run.run_cmd)
app.command("plan")(plan.plan_cmd)
app.command("demo")(demo.demo_cmd)
app.command("sisa")(demo.sisa_cmd)

forgetset_app = _group("Named, immutable, content-hashed forget sets (forget / retain / unseen / general).")
forgetset_app.command("create")(forgetset.create_cmd)
forgetset_app.command("preset")(forgetset.preset_cmd)
forgetset_app.command("ls")(forgetset.ls_cmd)
forgetset_app.command("show")(forgetset.show_cmd)
app.add_typer(forgetset_app, name="forgetset")

study_app = _group("Optuna studies over method × learning rate × steps, run by per-GPU workers.")
study_app.command("create")(study.create_cmd)
study_app.command("run")(study.run_cmd)
study_app.command("ls")(report.ls_cmd)
study_app.command("status")(report.status_cmd)
study_app.command("heatmap")(report.heatmap_cmd)
study_app.command("logs")(report.logs_cmd)
study_app.command("pause")(study.pause_cmd)
study_app.command("resume")(study.resume_cmd)
study_app.command("cancel")(study.cancel_cmd)
study_app.command("rm")(study.rm_cmd)
study_app.command("attack")(study.attack_cmd)
app.add_typer(study_app, name="study")

app.command("worker")(study.worker_cmd)
app.command("tui")(tui_cmd.tui_cmd)
app.command("export")(report.export_cmd)


def hide_storage_password(argv: list[str]) -> None:
    """A password given on the command line (`--storage postgresql://u:PASSWORD@host/db`) is shown
    by `ps` to every user of the machine while the command runs: overwrite this process's title with
    the password masked as soon as we see it. (UNLEARN_STORAGE_URL or .env never show it at all.)"""
    from studies.store.sqlite_file import describe_url, has_password

    if not any(has_password(a) for a in argv):
        return
    import setproctitle

    masked = [describe_url(a) if has_password(a) else a for a in argv]
    setproctitle.setproctitle(" ".join([os.path.basename(sys.argv[0]) or "unlearn", *masked]))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:
        hide_storage_password(sys.argv[1:])
        if not sys.argv[1:] and sys.stdin.isatty() and sys.stdout.isatty():
            argv = ["tui"]  # bare `unlearn` in a terminal opens the app
    try:
        app(args=argv, standalone_mode=False, prog_name="unlearn")
    except UnlearnError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `unlearn` outside a terminal: help, not an error
            out.print(exc.format_message(), markup=False, highlight=False)
            sys.exit(0)
        err.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except ABORTS:
        err.print("aborted", markup=False)
        sys.exit(130)
    except EXITS as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
