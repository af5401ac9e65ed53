"""The app: opens the store, owns navigation between screens and the command palette.

Build it with `create_app(storage_url)` (tests build it on any store the same way). The store is
opened in a thread worker, so an unreachable server never freezes the first paint; a store that
cannot be opened shows StoreErrorScreen with the one-line reason and a way to pick another.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Optional

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from tui.app import prefs
from tui.app.messages import CompareCells, ExportRequested, OpenStudy, OpenTrial, StudyAction

THEMES = ("textual-dark", "textual-light", "ansi-dark", "ansi-light")


class StoreOpened(Message):
    """The store, opened, with the settings read in the same worker: the lab's (a LabSettings) and
    the theme the app's settings name (None: none)."""

    def __init__(self, store, settings, theme: Optional[str] = None) -> None:
        super().__init__()
        self.store = store
        self.settings = settings
        self.theme = theme


class StoreFailed(Message):
    def __init__(self, url: str, reason: str, missing: bool) -> None:
        super().__init__()
        self.url, self.reason, self.missing = url, reason, missing


class UnlearnApp(App):
    CSS_PATH = "unlearn.tcss"
    TITLE = "unlearn-lab"
    BINDINGS = [
        Binding("?", "help", "help"),
        Binding("ctrl+t", "cycle_theme", "theme", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, storage_url: Optional[str] = None, refresh_s: float = 1.0, theme: Optional[str] = None,
                 read_devices: bool = True) -> None:
        """`storage_url` None: the settings' (UNLEARN_STORAGE_URL, then .env), resolved with the rest
        of the settings in the worker that opens the store, after the first frame."""
        super().__init__()
        self.storage_url = storage_url
        self.theme_given = theme is not None
        self.refresh_s = refresh_s  # every live screen polls the store this often (≤ 2 s)
        # How old a heartbeat may be before a run counts as lost (the live tables colour it by it):
        # the lab's setting, learnt with the store (None until then).
        self.heartbeat_timeout_s: Optional[float] = None
        self.read_devices = read_devices  # off only where a reading would make a snapshot differ
        self.store = None
        self.known_studies: list[str] = []
        self.compare_basket: set = set()  # cells marked for compare, across every study's dashboard
        self.theme = theme or prefs.load().get("theme") or "textual-dark"

    # ------------------------------------------------------------ opening the store

    def compose(self):
        from textual.widgets import Footer, Header, Static

        yield Header()
        yield Static("opening the store…", id="opening")
        yield Footer()

    def on_mount(self) -> None:
        self.open_store(self.storage_url)

    @work(thread=True, exclusive=True, group="store", name="open store")
    def open_store(self, url: Optional[str], create: bool = False) -> None:
        from engine.errors import UnlearnError
        from studies.settings import lab_settings
        from studies.store.db import Store, StoreMissing, describe_url
        from tui.app.settings import app_settings

        try:
            settings, theme = lab_settings(), app_settings().theme
        except Exception as exc:  # a malformed UNLEARN_* value: one line, and a store can still be picked
            self.post_message(StoreFailed(url or "", f"bad settings: {str(exc).splitlines()[0]}", missing=False))
            return
        url = url or settings.storage_url
        try:
            self.post_message(StoreOpened(Store(url, create=create), settings, theme))
        except StoreMissing as exc:
            self.post_message(StoreFailed(url, str(exc), missing=True))
        except UnlearnError as exc:
            self.post_message(StoreFailed(url, str(exc), missing=False))
        except Exception as exc:  # a driver error we do not know: still one line, never a traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.post_message(StoreFailed(url, f"cannot open store {describe_url(url)}: {reason}", missing=False))

    def on_store_opened(self, message: StoreOpened) -> None:
        from tui.app.screens.studies import StudiesScreen

        self.store = message.store
        self.storage_url = message.store.url
        self.sub_title = message.store.safe_url
        settings = message.settings
        self.heartbeat_timeout_s = settings.heartbeat_timeout
        if not self.theme_given:  # .env or UNLEARN_HOME may name what the environment did not
            theme = message.theme or prefs.load(settings.home).get("theme")
            if theme and theme != self.theme:
                self.theme = theme
        for _ in range(len(self.screen_stack) - 1):
            self.pop_screen()
        self.push_screen(StudiesScreen(self.store))

    def on_store_failed(self, message: StoreFailed) -> None:
        from tui.app.screens.store_error import StoreErrorScreen

        def retry(choice: Optional[tuple[str, bool]]) -> None:
            if choice is None:
                self.exit()
            else:
                self.open_store(*choice)

        self.push_screen(StoreErrorScreen(message.url, message.reason, message.missing), retry)

    # ------------------------------------------------------------ navigation (messages up)

    def on_studies_screen_studies_loaded(self, message) -> None:
        self.known_studies = [r["name"] for r in message.rows]  # what the command palette offers

    def on_open_study(self, message: OpenStudy) -> None:
        from tui.app.screens.dashboard import DashboardScreen

        self.push_screen(DashboardScreen(self.store, message.study, read_devices=self.read_devices,
                                         marked=frozenset(self.compare_basket)))

    def on_heatmap_grid_mark_toggled(self, message) -> None:
        (self.compare_basket.add if message.marked else self.compare_basket.discard)(message.cell)
        n = len(self.compare_basket)
        if message.marked:
            self.notify(f"{n} cell(s) marked{' across studies' if len({c.study for c in self.compare_basket}) > 1 else ''}: "
                        "C compares them", timeout=3)

    def on_open_trial(self, message: OpenTrial) -> None:
        from tui.app.screens.trial import TrialScreen

        self.push_screen(TrialScreen(self.store, message.cell))

    def on_compare_cells(self, message: CompareCells) -> None:
        from tui.app.screens.compare import CompareScreen

        cells = sorted(set(message.cells) | self.compare_basket, key=lambda c: (c.study, c.method, c.lr, c.steps))
        if len(cells) < 2:
            self.notify("mark two or more cells to compare (space on a heatmap cell)", severity="warning")
            return
        self.push_screen(CompareScreen(self.store, cells))

    def on_export_requested(self, message: ExportRequested) -> None:
        from tui.app.screens.export import ExportDialog

        def done(path: Optional[str]) -> None:
            if path:
                self.notify(f"wrote {path}", title="export")

        self.push_screen(ExportDialog(self.store, message.study, message.cell), done)

    def action_new_study(self) -> None:
        from tui.app.screens.new_study import NewStudyScreen

        def launched(name: Optional[str]) -> None:
            if name:
                self.post_message(OpenStudy(name))

        self.push_screen(NewStudyScreen(self.store, read_devices=self.read_devices), launched)

    def action_forget_sets(self) -> None:
        from tui.app.screens.forgetset_builder import ForgetSetBuilderScreen

        def saved(name: Optional[str]) -> None:
            if name:
                self.notify(f"forget set {name} saved", title="forget set")

        self.push_screen(ForgetSetBuilderScreen(self.store), saved)

    def action_help(self) -> None:
        from tui.app.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_cycle_theme(self) -> None:
        names = list(THEMES)
        self.set_theme(names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0])

    def set_theme(self, name: str) -> None:
        self.theme = name
        prefs.save({"theme": name})  # UNLEARN_HOME from the environment (as the first frame read it)
        self.notify(f"theme: {name}")

    def action_settings(self) -> None:
        from tui.app.screens.settings import SettingsScreen

        self.push_screen(SettingsScreen(self.theme, THEMES), lambda name: name and self.set_theme(name))

    # ------------------------------------------------------------ the command palette: every action

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.store is None:
            return
        yield SystemCommand("New study", "fill in the new-study form and launch it", self.action_new_study)
        yield SystemCommand("Forget sets", "build a forget set from files, folders, globs or hf: references",
                            self.action_forget_sets)
        yield SystemCommand("Settings", "theme (dark, light, ansi-dark, ansi-light)", self.action_settings)
        yield SystemCommand("Help", "the keys of every screen", self.action_help)
        for name in self.known_studies:
            yield SystemCommand(f"Open {name}", "the study's dashboard", partial(self.post_message, OpenStudy(name)))
            yield SystemCommand(f"Export {name}", "best per method or the Pareto front",
                                partial(self.post_message, ExportRequested(name)))
            for verb in ("pause", "resume", "cancel"):
                yield SystemCommand(f"{verb.capitalize()} {name}", f"{verb} the study",
                                    partial(self.study_action, verb, name))

    def study_action(self, verb: str, name: str) -> None:
        self.post_message(StudyAction(verb, name))

    def on_study_action(self, message: StudyAction) -> None:
        from tui.app.screens.confirm import ConfirmDialog

        verb, name = message.verb, message.study
        if verb in ("cancel", "delete"):
            question = (f"Cancel study {name}? Pending runs are dropped and running ones stopped; written cells stay."
                        if verb == "cancel" else f"Delete study {name} and all its cells? This cannot be undone.")
            self.push_screen(ConfirmDialog(question, yes=verb), lambda ok: ok and self.apply_study_action(verb, name))
        else:
            self.apply_study_action(verb, name)

    @work(thread=True, group="study-action", name="study action")
    def apply_study_action(self, verb: str, name: str) -> None:
        """The same functions as `unlearn study pause|resume|cancel|rm`; the outcome is one line."""
        from engine.errors import UnlearnError
        from studies.lifecycle.actions import study_action

        try:
            line = study_action(self.store, verb, name)
            self.call_from_thread(self.notify, line, title=name)
        except UnlearnError as exc:
            self.call_from_thread(self.notify, str(exc), title=name, severity="error")


def create_app(storage_url: Optional[str] = None, **kwargs) -> UnlearnApp:
    """The app on a store: the URL given, else the settings' (UNLEARN_STORAGE_URL, then .env),
    resolved once the first frame is up."""
    return UnlearnApp(storage_url, **kwargs)
