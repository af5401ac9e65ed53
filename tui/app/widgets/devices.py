"""DevicesPanel: what this machine can run on, as it is now: each GPU's memory in use and its
utilisation as bars (or why there is no GPU), and the CPU's cores and load.

The panel reads nothing by itself, not even once: its owner calls `refresh_devices()` when and as
often as it wants (the reading runs in a thread worker; a snapshot test need not call it at all).
Each reading is also posted up as `DevicesPanel.Refreshed`, so a form can offer the GPUs it shows."""
from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from studies.running.devices import DeviceReport, probe_devices

BAR_WIDTH = 16


def bar(fraction: float | None, width: int = BAR_WIDTH) -> Text:
    """A bar that is green under half, yellow under 90 %, red above (a full GPU will not fit a run)."""
    if fraction is None:
        return Text("─" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "green" if fraction < 0.5 else "yellow" if fraction < 0.9 else "red"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def gpu_lines(report: DeviceReport) -> Text:
    if not report.gpus:
        return Text(f"no GPU: {report.gpu_note}", style="dim")
    out = Text()
    for i, g in enumerate(report.gpus):
        total = g["memory_total_mib"] or 1.0
        util = g["utilization_pct"]
        if i:
            out.append("\n")
        out.append(f"GPU {g['index']} ", style="bold")
        out.append(f"{g['name']}\n")
        out.append("  mem  ")
        out.append_text(bar(g["memory_used_mib"] / total))
        out.append(f" {gib(g['memory_used_mib'])}/{gib(g['memory_total_mib'])} GiB, {gib(g['memory_free_mib'])} free\n")
        out.append("  util ")
        out.append_text(bar(None if util is None else util / 100))
        out.append(" —" if util is None else f" {util:.0f} %")
    return out


def cpu_line(report: DeviceReport) -> Text:
    c = report.cpu
    out = Text("CPU ", style="bold")
    out.append(f"{c.get('logical_cores', '?')} cores")
    if c.get("load_1") is not None:
        out.append(f"  load {c['load_1']:.2f} {c['load_5']:.2f} {c['load_15']:.2f}")
    if c.get("percent") is not None:
        out.append("\n  use  ").append_text(bar(c["percent"] / 100)).append(f" {c['percent']:.0f} %")
    return out


class DevicesPanel(Widget):
    DEFAULT_CSS = """
    DevicesPanel { height: auto; padding: 0 1; }
    DevicesPanel > Static { height: auto; }
    DevicesPanel > #devices-cpu { margin-top: 1; }
    """

    class Refreshed(Message):
        """A new reading of the devices."""

        def __init__(self, report: DeviceReport) -> None:
            super().__init__()
            self.report = report

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.report: DeviceReport | None = None

    def compose(self) -> ComposeResult:
        yield Static("reading devices…", id="devices-gpus")
        yield Static("", id="devices-cpu")

    class Read(Message):
        """A reading, from the worker to the panel itself."""

        def __init__(self, report: DeviceReport) -> None:
            super().__init__()
            self.report = report

    @work(thread=True, exclusive=True, name="read devices", group="devices")
    def refresh_devices(self) -> None:
        self.post_message(self.Read(probe_devices()))

    def on_devices_panel_read(self, message: Read) -> None:
        message.stop()
        self.report = message.report
        self.query_one("#devices-gpus", Static).update(gpu_lines(message.report))
        self.query_one("#devices-cpu", Static).update(cpu_line(message.report))
        self.post_message(self.Refreshed(message.report))
