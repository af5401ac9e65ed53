"""What a user says about a SLURM job array, declared once for both faces: `unlearn study run NAME
--slurm` builds one flag per SLURM_FIELDS entry (tui/cli/study.py) and the app's new-study form one
field per entry (tui/app/screens/new_study.py); both hand what was given to `slurm_options`, so both
accept the same values and say the same thing when one is wrong.

Light: no submitit, no torch (the app's process and the CLI's help import it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.errors import UnlearnError

DEFAULT_TIME = "24:00:00"
# With --requeue, a task that reaches its time limit is requeued at most this many times (a run
# longer than --time starts again from step 0 each time: the count bounds that loop). Preemptions
# are not counted: the cluster decides those.
MAX_TIME_LIMIT_REQUEUES = 50


@dataclass(frozen=True)
class SlurmOptions:
    jobs: int = 1  # array tasks, each a worker pool
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = DEFAULT_TIME  # HH:MM:SS per task
    gpus_per_job: int = 0  # 0: CPU tasks
    cpus_per_gpu: int | None = None  # a CPU task's CPUs when gpus_per_job is 0 (default 1)
    mem_per_gpu: str | None = None  # e.g. 40G (a CPU task: its memory)
    extra: dict = field(default_factory=dict)  # --slurm-opt KEY=VALUE, sbatch's own names
    requeue: bool = False  # a task at its time limit or preempted goes back in the queue
    allow_sqlite: bool = False

    def validate(self) -> "SlurmOptions":
        if self.jobs < 1:
            raise UnlearnError(f"--jobs must be at least 1, not {self.jobs}")
        if self.gpus_per_job < 0:
            raise UnlearnError(f"--gpus-per-job must be 0 or more, not {self.gpus_per_job}")
        if self.cpus_per_gpu is not None and self.cpus_per_gpu < 1:
            raise UnlearnError(f"--cpus-per-gpu must be at least 1, not {self.cpus_per_gpu}")
        parts = self.time.split(":")
        if not (1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)) or self.seconds <= 0:
            raise UnlearnError(f"--time must be HH:MM:SS (or MM:SS, or minutes) above zero, not {self.time!r}")
        return self

    @property
    def seconds(self) -> int:
        parts = [int(p) for p in self.time.split(":")]
        if len(parts) == 1:
            return parts[0] * 60  # sbatch reads a lone number as minutes
        h, m, s = [0] * (3 - len(parts)) + parts
        return h * 3600 + m * 60 + s

    @property
    def minutes(self) -> int:
        return max(1, -(-self.seconds // 60))


@dataclass(frozen=True)
class SlurmField:
    """One thing a user can say about the array: a flag of `study run` and a field of the app's
    form (`form=False`: the CLI only)."""

    name: str  # the SlurmOptions attribute
    flag: str
    help: str
    kind: type  # int, str, bool; list: KEY=VALUE pairs
    form: bool = True

    @property
    def default(self):
        f = next(f for f in fields(SlurmOptions) if f.name == ("extra" if self.kind is list else self.name))
        return None if self.kind is list else f.default


SLURM_FIELDS = (
    SlurmField("jobs", "--jobs", "array tasks, each a worker pool on its own devices", int),
    SlurmField("partition", "--partition", "the partition (default: the cluster's)", str),
    SlurmField("account", "--account", "the account to charge", str),
    SlurmField("qos", "--qos", "the quality of service", str),
    SlurmField("time", "--time", "each task's time limit, HH:MM:SS", str),
    SlurmField("gpus_per_job", "--gpus-per-job", "GPUs per task (0: CPU tasks); a study's --gpus-per-run takes "
               "that many of them per run", int),
    SlurmField("cpus_per_gpu", "--cpus-per-gpu", "CPUs per GPU (a CPU task: its CPUs; default 1)", int),
    SlurmField("mem_per_gpu", "--mem-per-gpu", "memory per GPU, e.g. 40G (a CPU task: its memory)", str),
    SlurmField("extra", "--slurm-opt", "another sbatch option, KEY=VALUE (repeatable)",
               list),
    SlurmField("requeue", "--requeue", "a task stopped by its time limit or a preemption goes back in the queue and "
               f"serves on (its runs are given back, no attempt spent; at most {MAX_TIME_LIMIT_REQUEUES} time limits "
               "per task)", bool),
    SlurmField("allow_sqlite", "--slurm-allow-sqlite", "allow an SQLite store (a one-node allocation only)", bool,
               form=False),
)


def parse_slurm_opts(pairs, label: str = "--slurm-opt") -> dict:
    """KEY=VALUE pairs (sbatch's option names, dashes or not) into a dict: a list (the CLI's repeated
    flag) or one text with the pairs separated by spaces (the app's field)."""
    if isinstance(pairs, str):
        pairs = pairs.split()
    out = {}
    for pair in pairs or ():
        key, eq, value = pair.partition("=")
        if not eq or not key.strip().lstrip("-"):
            raise UnlearnError(f"{label} takes KEY=VALUE (an sbatch option, e.g. constraint=a100), not {pair!r}")
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


def slurm_options(given: dict, label_of=lambda f: f.flag) -> SlurmOptions:
    """SlurmOptions from what a face was given: {field name: value}, where a value may be the text of
    a form's field (blank: the default) or the CLI's typed value (None: the default). Errors are one
    line naming the input by `label_of(field)`."""
    values = {}
    for f in SLURM_FIELDS:
        value = given.get(f.name)
        if isinstance(value, str) and f.kind is not list:
            value = value.strip() or None
        if value is None or (f.kind is list and not value):
            continue
        if f.kind is list:
            values[f.name] = parse_slurm_opts(value, label_of(f))
        elif f.kind is int and not isinstance(value, int):
            try:
                values[f.name] = int(value)
            except ValueError:
                raise UnlearnError(f"{label_of(f)} takes a whole number, not {value!r}") from None
        else:
            values[f.name] = value
    try:
        return SlurmOptions(**values).validate()
    except UnlearnError as exc:  # validate names the flags; a form names its fields
        message = str(exc)
        for f in SLURM_FIELDS:
            message = message.replace(f.flag, label_of(f))
        raise UnlearnError(message) from None
