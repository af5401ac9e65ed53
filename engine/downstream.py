"""Downstream tasks through EleutherAI's lm-evaluation-harness, on the model in memory.

    unlearn run ... --eval-tasks arc_easy,piqa [--eval-tasks-dir DIR] [--eval-tasks-limit N]

`evaluate_tasks` wraps the live model and tokenizer in lm-eval's `HFLM` (no reload, no copy) and
calls `lm_eval.simple_evaluate`. Task names are lm-eval's own, or those of YAML task files in
`--eval-tasks-dir` (lm-eval's `TaskManager(include_path=DIR)`: for boxes without the Hub, point
the task's `dataset_path`/`data_files` at local files). Each task reports one figure,
`downstream.{task}`: its length-normalised accuracy `acc_norm` where the task reports one (ARC,
HellaSwag, PIQA, OpenBookQA...), else `acc` (docs/benchmark-metrics.md).

lm-eval is an optional extra (`pip install 'unlearn-lab[eval]'`); without it the run stops with one
line saying so. The global random states (Python, NumPy, torch) are saved and restored around the
call, since lm-eval seeds them: a run's training is the same with and without downstream tasks.
"""
from __future__ import annotations

import contextlib
import logging
import random

from engine.errors import UnlearnError

MAIN_METRICS = ("acc_norm", "acc")  # the first one a task reports is its downstream figure
INSTALL_HINT = "pip install 'unlearn-lab[eval]'"


def parse_tasks(text: str) -> tuple[str, ...]:
    """'arc_easy, piqa,arc_easy' -> ('arc_easy', 'piqa'): names in the order given, each once."""
    out: list[str] = []
    for name in (text or "").split(","):
        name = name.strip()
        if not name:
            continue
        if any(c.isspace() for c in name):
            raise UnlearnError(f"--eval-tasks: {name!r} is not a task name (comma-separated names, no spaces)")
        if name not in out:
            out.append(name)
    return tuple(out)


def require_lm_eval():
    """The lm_eval module, or one UnlearnError line naming the extra to install."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise UnlearnError(f"--eval-tasks needs lm-eval, which is not installed ({e.name or e}); "
                           f"{INSTALL_HINT}") from None
    return lm_eval


def main_metric(task_result: dict) -> float | None:
    """A task's figure from lm-eval's per-task results ({"acc,none": ..., "acc_norm,none": ...})."""
    for name in MAIN_METRICS:
        for key, value in task_result.items():
            if key.split(",", 1)[0] == name and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


@contextlib.contextmanager
def _kept_random_state():
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _lm_class(HFLM):
    """HFLM whose encodings never end with an EOS the tokenizer appends to every text (a template
    like "<s> $A </s>"): lm-eval takes a continuation's tokens as those of context + continuation
    past len(context's tokens), which a trailing EOS would shift by one. Texts start as documents
    do (BOS where the tokenizer adds one), as in engine.benchmark_metrics.lm.encode_prefix."""

    class LiveHFLM(HFLM):
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)
            eos = self.tokenizer.eos_token_id
            if ids and eos is not None and ids[-1] == eos and not string.endswith(str(self.tokenizer.eos_token)):
                ids = ids[:-1]
            return ids[-left_truncate_len:] if left_truncate_len else ids

    return LiveHFLM


def evaluate_tasks(model, tokenizer, tasks: tuple[str, ...] | str, tasks_dir: str = "", limit: int = 0,
                   batch_size: int = 8) -> dict[str, float | None]:
    """{task: its acc_norm or acc} for each named task, on `model` as it is (eval mode during the
    call, its mode restored after). `limit` > 0: the first `limit` examples of each task."""
    if isinstance(tasks, str):
        tasks = parse_tasks(tasks)
    if not tasks:
        return {}
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # its per-request warnings would drown a run's progress lines
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=tasks_dir or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in --eval-tasks-dir {tasks_dir})" if tasks_dir else " (task files on disk: --eval-tasks-dir DIR)"
        raise UnlearnError(f"--eval-tasks: lm-eval knows no task {unknown[0]!r}{where}")
    was_training = model.training
    model.eval()
    try:
        with _kept_random_state():
            lm = _lm_class(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                 max_length=getattr(model.config, "max_position_embeddings", None))
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                          limit=limit or None, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR")
    except UnlearnError:
        raise
    except Exception as e:  # noqa: BLE001 - a task that cannot load its data, a bad task file: one line
        msg = " ".join(str(e).split())[:300]
        raise UnlearnError(f"--eval-tasks: lm-eval failed: {e.__class__.__name__}: {msg}") from None
    finally:
        if was_training:
            model.train()
    results = (out or {}).get("results", {})
    return {t: main_metric(results.get(t, {})) for t in tasks}
