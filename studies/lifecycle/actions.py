"""pause / resume / cancel / delete a study, each returning the one line the user reads: the
same functions behind `unlearn study pause|resume|cancel|rm` and the app's keys."""
from __future__ import annotations

from engine.errors import UnlearnError
from studies.store.db import Store
from studies.store.states import StudyState

VERBS = ("pause", "resume", "cancel", "delete")


def study_action(store: Store, verb: str, name: str, heartbeat_timeout_s: float | None = None,
                 retry_failed: bool = False) -> str:
    """`heartbeat_timeout_s` None: the lab's setting (UNLEARN_HEARTBEAT_TIMEOUT)."""
    from studies.lifecycle.study import delete_study, resume_study, set_state
    from studies.settings import lab_settings
    from studies.store.clock import age_s

    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = lab_settings().heartbeat_timeout

    if verb == "pause":
        return f"study {name}: {set_state(store, name, StudyState.PAUSED).state}"
    if verb == "cancel":
        from studies.running.slurm import cancel_arrays

        study = set_state(store, name, StudyState.CANCELLED)
        arrays = cancel_arrays(store, study)  # its SLURM workers, if it has any queued or running
        return f"study {name}: {study.state}" + (f"; SLURM job array(s) {', '.join(arrays)} cancelled" if arrays else "")
    if verb == "delete":
        return f"study {name} deleted ({delete_study(store, name, heartbeat_timeout_s)} cells)"
    if verb == "resume":
        resumed = resume_study(store, name, retry_failed=retry_failed)
        message = resumed.message
        if resumed.running:
            age = age_s(resumed.study.scheduler_heartbeat, store.now())
            if age is None or age > heartbeat_timeout_s:
                message += (f"; no scheduler serves it: start one with `unlearn study run {name}`"
                            " (--detach to leave it running)")
            else:
                message += f"; scheduler pid {resumed.study.scheduler_pid} on {resumed.study.scheduler_host} picks its runs up"
        return message
    raise UnlearnError(f"unknown study action {verb!r}; one of: {', '.join(VERBS)}")
