"""The engine is headless: nothing in it imports textual, the TUI or the studies layer, so a run
works the same from the CLI, a worker subprocess or a notebook. And studies never import the UI.

Two checks: a dynamic one (import every engine module in a fresh interpreter, then look at
sys.modules) and a static one (every import statement of every file, with ast), which also
catches imports inside functions that the dynamic check never runs."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FORBIDDEN = ("textual", "tui", "studies")
STUDIES_FORBIDDEN = ("textual", "tui")

PROBE = r"""
import importlib, json, pkgutil, sys
import engine
names = ["engine"]
for info in pkgutil.walk_packages(engine.__path__, "engine."):
    importlib.import_module(info.name)
    names.append(info.name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def _hits(modules, forbidden):
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_importing_every_engine_module_loads_no_ui_or_studies():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    files = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
             for p in (ROOT / "engine").rglob("*.py")}
    assert files <= set(report["imported"]), f"not imported: {sorted(files - set(report['imported']))}"
    assert {"engine.run", "engine.evaluate", "engine.methods.paper_presets"} <= set(report["imported"])
    assert _hits(report["modules"], ENGINE_FORBIDDEN) == []


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, absolute and relative."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}:
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def static_violations(folder: Path, forbidden) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: imports {mod}"
            for p in sorted(folder.rglob("*.py"))
            for line, mod in imported_modules(p) if _hits([mod], forbidden)]


def test_static_check_sees_forbidden_imports(tmp_path):
    """The checker itself: it flags the forms it claims to (so the two tests below can fail)."""
    (tmp_path / "bad.py").write_text(
        "import os\nimport textual.app\nfrom tui import cli\nimport importlib\n"
        "def f():\n    from studies.reading.grid import x\n    importlib.import_module('tui.screens')\n"
        "import tuition\nfrom studies_helper import y\n")
    found = [mod for _, mod in imported_modules(tmp_path / "bad.py") if _hits([mod], ENGINE_FORBIDDEN)]
    assert sorted(found) == ["studies.reading.grid", "textual.app", "tui", "tui.screens"]


def test_engine_sources_never_import_ui_or_studies():
    files = list((ROOT / "engine").rglob("*.py"))
    assert len(files) >= 10
    assert static_violations(ROOT / "engine", ENGINE_FORBIDDEN) == []


def test_studies_never_import_the_ui():
    folder = ROOT / "studies"
    if not folder.is_dir() or not any(folder.rglob("*.py")):
        pytest.skip("studies/ has no Python files yet")
    assert static_violations(folder, STUDIES_FORBIDDEN) == []


# ------------------------------------------------------------------ the light read path

HEAVY = ("torch", "transformers", "accelerate", "datasets", "sklearn")
READ_PROBE = r"""
import json, os, sys
from tui.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
with open(os.environ["PROBE_REPORT"], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


@pytest.fixture(scope="module")
def read_store(tmp_path_factory):
    """A store with a forget set and a study with computed cells, made without loading a model."""
    from sqlmodel import select

    from studies.lifecycle.study import create_study
    from studies.store.db import CellRow, Run, Store
    from studies.store.forgetsets import create_forget_set

    d = tmp_path_factory.mktemp("read")
    for role in ("forget", "retain", "retain_eval", "unseen"):
        (d / f"{role}.txt").write_text(f"the {role} document, long enough to be a document " * 3)
    store = Store(f"sqlite:///{d / 'lab.db'}")
    create_forget_set(store, "fs", [str(d / "forget.txt")], [str(d / "retain.txt")], [str(d / "unseen.txt")],
                      retain_eval=[str(d / "retain_eval.txt")])
    create_study(store, "S", "EleutherAI/pythia-14m", "fs", methods=["ga", "ga_gd"], lrs=[1e-4], steps=[2, 4])
    verdict = {"forget": False, "mia": False, "utility": True}
    with store.write() as s:
        for run in s.exec(select(Run)).all():
            run.state = "done"
            # θ0's figures and verdict, as a finished run records them (the heatmap's note reads them)
            run.result = {"baseline": {"ppl_forget": 1.5, "ppl_unseen": 2.0, "forget_gap": 0.29, "mia_auc_lo": 0.45,
                                       "mia_auc_hi": 0.62, "verdict": {"forget": False, "mia": True, "utility": True},
                                       "success": False, "target": {"band": 0.1}}}
            # step 3: the at-target cell between the milestones, a row of its own (the heatmap's column)
            for step, at_target in ((2, False), (3, True), (4, False)):
                m = {"step": step, "eval_score": 0.5 / step, "forget_gap": 0.5 / step, "retain_eval_drift": 0.0,
                     "score": 0.5 / step, "retain_drift": 0.0, "verdict": verdict, "success": False,
                     "at_target": at_target, "diverged": False, "ppl_forget": 2.0, "ppl_retain": 2.0,
                     "ppl_retain_eval": 2.0, "ppl_unseen": 2.0, "mia_auc": {"loss": 0.6}, "mia_auc_lo": 0.55,
                     "mia_auc_hi": 0.65}
                s.add(CellRow(run_id=run.id, step=step, metrics=m, score=m["eval_score"]))
    return store.url


@pytest.mark.parametrize("argv", [
    ["study", "ls"], ["study", "ls", "--json"], ["study", "status", "S"], ["study", "status", "S", "--json"],
    ["study", "heatmap", "S"], ["study", "heatmap", "S", "--json", "--metric", "mia_auc.loss"],
    ["forgetset", "ls"], ["forgetset", "show", "fs", "--json"], ["export", "S"], ["export", "S", "--format", "json"],
    ["methods"], ["methods", "--json"], ["--help"], ["study", "--help"],
], ids=lambda a: " ".join(a))
def test_read_only_commands_import_no_training_library(argv, read_store, tmp_path):
    """`unlearn study ls` and every other command that only reads: no torch, transformers,
    accelerate, datasets or scikit-learn in the process (they cost seconds to import)."""
    report = tmp_path / "report.json"
    store_args = ["--storage", read_store] if argv[0] in ("study", "forgetset", "export") and "--help" not in argv else []
    proc = subprocess.run([sys.executable, "-c", READ_PROBE, *argv, *store_args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PROBE_REPORT": str(report)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["code"] in (0, None), proc.stdout + proc.stderr
    assert proc.stdout.strip(), "the command printed nothing"
    assert _hits(result["modules"], HEAVY) == []


APP_PROBE = r"""
import asyncio, json, os, sys
from tui.app.app import create_app
from tui.app.messages import CellRef, CompareCells, ExportRequested, OpenTrial

async def walk():
    app = create_app(sys.argv[1], refresh_s=0.2)
    async with app.run_test(size=(100, 40)) as pilot:
        async def changed(before, timeout=30.0):
            for _ in range(int(timeout / 0.05)):
                await pilot.pause(0.05)
                if app.screen is not before:
                    break
            await pilot.pause(0.5)  # its workers read what it shows

        for _ in range(600):
            await pilot.pause(0.05)
            tables = app.screen.query("#studies") if type(app.screen).__name__ == "StudiesScreen" else []
            if tables and tables.first().row_count:
                break
        seen = [type(app.screen).__name__]
        steps = [lambda: pilot.press("enter"),
                 lambda: app.post_message(OpenTrial(CellRef("S", "ga", 1e-4, 2))),
                 lambda: app.post_message(CompareCells([CellRef("S", "ga", 1e-4, 2), CellRef("S", "ga_gd", 1e-4, 4)])),
                 lambda: app.post_message(ExportRequested("S")),
                 app.action_forget_sets, app.action_new_study, app.action_help]
        for step in steps:
            before = app.screen
            result = step()
            if asyncio.iscoroutine(result):
                await result
            await changed(before)
            seen.append(type(app.screen).__name__)
    return seen

seen = asyncio.run(walk())
with open(os.environ["PROBE_REPORT"], "w") as f:
    json.dump({"screens": seen, "modules": sorted(sys.modules)}, f)
"""


def test_the_app_process_imports_no_training_library(read_store, tmp_path):
    """The app through every screen (studies, dashboard, trial, compare, export, forget sets, new
    study, help): no torch, transformers, accelerate, datasets or scikit-learn in its process."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", APP_PROBE, read_store], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PROBE_REPORT": str(report)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["screens"] == ["StudiesScreen", "DashboardScreen", "TrialScreen", "CompareScreen", "ExportDialog",
                                 "ForgetSetBuilderScreen", "NewStudyScreen", "HelpScreen"]
    assert "textual" in result["modules"]
    assert _hits(result["modules"], HEAVY) == []
