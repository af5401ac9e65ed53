"""The detached worker pool that `unlearn study run --detach` starts, and the app's Launch button
too, so both faces launch a study the same way (what they type is parsed in
studies/lifecycle/inputs.py, also shared)."""
from __future__ import annotations

from pathlib import Path

from studies.store.db import Store


def check_no_live_scheduler(store: Store, name: str, heartbeat_timeout_s: float | None = None) -> None:
    """Refuse a second scheduler on a study whose scheduler is alive: its heartbeat is fresh and,
    when it runs on this host, its process exists. Two pools on one study would share its devices
    and each find less memory free than planned."""
    import os

    from engine.errors import UnlearnError
    from studies.running.processes import pid_alive
    from studies.settings import lab_settings
    from studies.store.clock import age_s
    from studies.store.db import hostname

    study = store.study(name)
    age = age_s(study.scheduler_heartbeat, store.now())
    timeout = heartbeat_timeout_s if heartbeat_timeout_s is not None else lab_settings().heartbeat_timeout
    pid, host = study.scheduler_pid, study.scheduler_host
    if age is None or age >= timeout or not pid or (host == hostname() and (pid == os.getpid() or not pid_alive(pid))):
        return
    raise UnlearnError(f"study {name} is already run by scheduler pid {pid} on {host} (heartbeat {age:.0f} s ago): "
                       f"follow it with `unlearn study status {name}`, or stop it (unlearn study pause {name}) first")


def launch_detached(store: Store, name: str, slots: list[str], retry_failed: bool = True) -> tuple[str, int | None, Path | None]:
    """What `unlearn study run NAME --detach` does: hand the study's runs out again, then start the
    worker pool in its own session (it outlives the terminal). Returns (one line for the user, the
    pool's pid, its log); pid and log are None when there was nothing to run. Refused while another
    scheduler runs the study."""
    from studies.lifecycle.study import resume_study
    from studies.running.pool import detach

    check_no_live_scheduler(store, name)
    resumed = resume_study(store, name, retry_failed=retry_failed)
    if not resumed.running:
        return resumed.message, None, None
    pid, log = detach(store, name, slots)
    return (f"scheduler pid {pid} runs study {name} on {', '.join(slots)}; log {log}. "
            f"Follow it: unlearn study status {name}"), pid, log
