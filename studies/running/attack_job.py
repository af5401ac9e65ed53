"""The best-cell attack job's lifecycle, across every pool on every node: claimed once, beating while
it runs, started again when its node is gone, and fenced like a run's attempt.

Where the job stands is kept as events of its study (ATTACK_EVENTS), so every pool sees it. A claim
is an "attacks started" event naming the pool that wrote it (pid, node); its id is the claim. The
job's process beats on the study row (`attack_heartbeat`, on the store's clock) while its claim is
the study's last attack event. A job is taken to be gone when the pool that claimed it is gone
from this node, or, on another node, when its beat is older than the heartbeat timeout; the next
pool then claims it again, and the old process, should it still be running, finds its claim
superseded at its next beat and stops (its late "done" or "failed" is not written).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from sqlmodel import select

from studies.running.processes import pid_alive
from studies.store.clock import age_s
from studies.store.db import Event, Store, Study, hostname

# The best-cell attack job's events, in the order they happen. "stopped" (the pool was interrupted,
# or the process that ran it is gone) makes the job due again; "done" and "failed" end it: a
# failed job is not retried by the pool (it costs a run per method), `unlearn study attack` reruns it.
ATTACK_EVENTS = ("attacks started", "attacks stopped", "attacks done", "attacks failed")


def _last_event(session, study_id: int) -> Optional[Event]:
    return session.exec(select(Event).where(Event.study_id == study_id, Event.kind.in_(ATTACK_EVENTS))
                        .order_by(Event.id.desc()).limit(1)).first()


def attack_job_state(store: Store, study_id: int) -> tuple[str | None, Event | None]:
    """The last best-cell attack event of a study: (its kind without "attacks ", the event), or
    (None, None) when the job never started."""
    with store.read() as s:
        last = _last_event(s, study_id)
    return (last.kind.split(" ", 1)[1], last) if last is not None else (None, None)


def owner_alive(started: Event, node: str, beat_age_s: Optional[float] = None,
                heartbeat_timeout_s: Optional[float] = None) -> bool:
    """Whether the job an "attacks started" event claimed still runs. On this node: its pool's pid
    exists. On another: its last beat (`beat_age_s`, None: none yet) is within the timeout; without
    a timeout, or for an event that names no pool (written before v4), it is taken to be alive."""
    if started.pid is None:
        return True
    if started.host == node:
        return pid_alive(started.pid)
    if heartbeat_timeout_s is None or beat_age_s is None:
        return True
    return beat_age_s <= heartbeat_timeout_s


def claim_attack_job(store: Store, study: Study, heartbeat_timeout_s: Optional[float] = None,
                     node: Optional[str] = None) -> Optional[int]:
    """Claim the study's best-cell attack job if it is due: never started, stopped, or claimed by a
    job that is gone (owner_alive). One write transaction with the study row locked, so one pool
    wins. Returns the claim (its "attacks started" event's id), or None."""
    node = node or hostname()
    with store.write() as s:
        row = s.exec(select(Study).where(Study.id == study.id).with_for_update()).first()  # PostgreSQL: one claimer
        now = store.now(s)
        last = _last_event(s, study.id)
        taken_over = ""
        if last is not None and last.kind in ("attacks done", "attacks failed"):
            return None
        if last is not None and last.kind == "attacks started":
            age = age_s(row.attack_heartbeat or last.at, now)
            if owner_alive(last, node, age, heartbeat_timeout_s):
                return None
            taken_over = (f" (the job of pid {last.pid} on {last.host} is gone" +
                          (f": no beat for {age:.0f} s)" if last.host != node else ")"))
        pid = os.getpid()
        row.attack_heartbeat = now
        s.add(row)
        event = Event(study_id=study.id, kind="attacks started", pid=pid, host=node, at=now,
                      message=f"best-cell attacks started by pid {pid} on {node}{taken_over}")
        s.add(event)
        s.flush()
        return event.id


def log_attack_event(store: Store, study_id: int, claim: Optional[int], kind: str, message: str) -> bool:
    """Write an attack event for the job of claim `claim` (None: whoever runs it), only while that
    claim is the study's last attack event: a job superseded by another pool's claim writes
    nothing. True when written."""
    with store.write() as s:
        s.exec(select(Study).where(Study.id == study_id).with_for_update()).first()
        last = _last_event(s, study_id)
        if claim is not None and (last is None or last.id != claim):
            return False
        s.add(Event(study_id=study_id, kind=kind, message=message, at=store.now(s)))
    return True


class AttackBeat(threading.Thread):
    """The job's heartbeat: writes study.attack_heartbeat every `every_s` while its claim holds. A
    beat that finds the claim superseded sets `lost`; the job stops at its next step (`check`)."""

    def __init__(self, store: Store, study_id: int, claim: int, every_s: float):
        super().__init__(daemon=True, name=f"attack-beat-{study_id}")
        self.store, self.study_id, self.claim, self.every_s = store, study_id, claim, every_s
        self.lost = False
        self._halt = threading.Event()

    def beat(self) -> None:
        with self.store.write() as s:
            row = s.exec(select(Study).where(Study.id == self.study_id).with_for_update()).first()
            last = _last_event(s, self.study_id)
            if row is None or last is None or last.id != self.claim:
                self.lost = True
                self._halt.set()
                return
            row.attack_heartbeat = self.store.now(s)
            s.add(row)

    def check(self) -> None:
        if self.lost:
            raise AttackJobLost(f"best-cell attack job (claim {self.claim}) was taken over by another pool")

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            try:
                self.store.retry(self.beat)
            except Exception:  # noqa: BLE001 - a missed beat is not worth stopping the job for
                pass

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


class AttackJobLost(RuntimeError):
    """This job's claim is no longer the study's: another pool runs the job now."""
