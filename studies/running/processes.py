"""The processes the lab starts, each command line built here and nowhere else: a run's worker
(under torchrun when the run spans several devices), a study's best-cell attack job and a detached
scheduler; and whether a process on this host still lives.

The store's URL never goes on a command line: `ps` shows every user of the box a command line (and
a password in it), while a process's environment is readable by its owner alone (child_env).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from studies.store.db import Store


def worker_command(run_id: int, device: str, threads: int, processes: int = 1, attempt: int | None = None) -> list[str]:
    """One run (studies/running/worker.py); with `processes` > 1 one worker per device under torchrun,
    each an Accelerator process. torchrun, because `accelerate launch --cpu` would start one process,
    whatever --num_processes says."""
    worker = ["-m", "studies.running.worker", "--run-id", str(run_id), "--device", device, "--threads", str(threads),
              *(["--attempt", str(attempt)] if attempt is not None else [])]
    if processes == 1:
        return worker
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *worker]


def attack_command(study: str, device: str, threads: int, claim: int) -> list[str]:
    """A study's attacks and downstream tasks at each method's best cell (studies/running/attack.py),
    run under the pool's claim on the job (studies/running/attack_job.py)."""
    return ["-m", "studies.running.attack", "--study", study, "--device", device, "--threads", str(threads),
            "--claim", str(claim)]


def pool_command(study: str, slots: list[str]) -> list[str]:
    """A worker pool serving one study on these slots (studies/running/pool.py's main)."""
    return ["-m", "studies.running.pool", "--study", study, "--slots", ",".join(slots)]


def devices_of(slots: list[str]) -> tuple[str, str]:
    """(CUDA_VISIBLE_DEVICES, the --device a process on these slots is given): the slots' GPUs
    renumbered from 0 for it, or none at all on CPU slots."""
    if slots[0].startswith("cuda"):
        return ",".join(s.split(":")[1] for s in slots), "cuda"
    return "", "cpu"


def start(command: list[str], store: Store, log: Path, cuda_visible: str | None = None,
          new_session: bool = False) -> subprocess.Popen:
    """`python COMMAND` with its output appended to `log` and the store in its environment.
    `new_session`: its own session, out of reach of this terminal's Ctrl-C and hang-up (a detached
    scheduler outlives the terminal; a run is stopped by its pool alone)."""
    env = child_env(store)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)


def child_env(store: Store) -> dict:
    """The environment of a process the lab starts: the store's URL travels here, never on the
    command line."""
    return {**os.environ, "UNLEARN_STORAGE_URL": store.url}


def free_port() -> int:
    """A TCP port free now, for a multi-process run's rendezvous (two such runs on one box must not
    share accelerate's default port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether the process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, never reaped: PID 1 of many containers does not wait) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
