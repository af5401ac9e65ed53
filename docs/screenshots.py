"""Take the SVG screenshots in docs/screenshots/ with the app itself, on the quick demo's store.

    unlearn demo --quick --workspace unlearn-demo
    python docs/screenshots.py --workspace unlearn-demo

Each screen is reached with the keys a user presses (Pilot) and saved by Textual's own
`save_screenshot`, at 100×32 (the README's size) unless --size says otherwise."""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path


async def _until(pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        if predicate():
            await pilot.pause(0.5)
            return
    raise SystemExit(f"screen {pilot.app.screen!r} never finished loading")


async def take(url: str, out: Path, size: tuple[int, int], theme: str) -> list[Path]:
    from textual.widgets import DataTable

    from tui.app.app import create_app
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.studies import StudiesScreen
    from tui.app.screens.trial import TrialScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    out.mkdir(parents=True, exist_ok=True)
    written = []
    app = create_app(url, refresh_s=0.5, theme=theme, read_devices=False)
    async with app.run_test(size=size) as pilot:

        def shot(name: str) -> None:
            written.append(Path(app.save_screenshot(filename=f"{name}.svg", path=str(out))))

        await _until(pilot, lambda: isinstance(app.screen, StudiesScreen)
                     and app.screen.query_one("#studies", DataTable).row_count > 0)
        shot("studies")
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, DashboardScreen) and len(app.screen.query(HeatmapGrid)) > 0
                     and app.screen.query_one("#trials", DataTable).row_count > 0)
        await pilot.press("down", "right", "right")
        await pilot.pause(0.3)
        shot("dashboard")
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, TrialScreen) and app.screen.detail is not None)
        shot("trial")
        await pilot.press("escape")
        await pilot.press("e")
        await pilot.pause(1.0)
        shot("export")
        await pilot.press("escape", "escape")
        await pilot.press("f")
        await pilot.pause(1.0)
        shot("forget-set-builder")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, default=Path("unlearn-demo"), help="the quick demo's workspace")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "screenshots")
    p.add_argument("--size", default="100x32", help="columns x rows")
    p.add_argument("--theme", default="textual-dark")
    a = p.parse_args()
    db = a.workspace.resolve() / "unlearn.db"
    if not db.exists():
        raise SystemExit(f"no demo store at {db}: run `unlearn demo --quick --workspace {a.workspace}` first")
    cols, rows = (int(x) for x in a.size.lower().split("x"))
    for path in asyncio.run(take(f"sqlite:///{db}", a.out, (cols, rows), a.theme)):
        print(path)


if __name__ == "__main__":
    main()
