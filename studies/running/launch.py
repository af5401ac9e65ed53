"""The detached worker pool that `unlearn study run --detach` starts, and the app's Launch button
too, so both faces launch a study the same way (what they type is parsed in
studies/lifecycle/inputs.py, also shared)."""
from __future__ import annotations

from pathlib import Path

from studies.store.db import Store


def launch_detached(store: Store, name: str, slots: list[str], retry_failed: bool = True) -> tuple[str, int | None, Path | None]:
    """What `unlearn study run NAME --detach` does: hand the study's runs out again, then start the
    worker pool in its own session (it outlives the terminal). Returns (one line for the user, the
    pool's pid, its log); pid and log are None when there was nothing to run."""
    from studies.lifecycle.study import resume_study
    from studies.running.pool import detach

    resumed = resume_study(store, name, retry_failed=retry_failed)
    if not resumed.running:
        return resumed.message, None, None
    pid, log = detach(store, name, slots)
    return (f"scheduler pid {pid} runs study {name} on {', '.join(slots)}; log {log}. "
            f"Follow it: unlearn study status {name}"), pid, log
