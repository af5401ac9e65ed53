"""What the bench scripts share: alternating repetitions, medians and the verdict, the JSON last line,
and a tiny Llama (random weights, built from a config, saved and loaded with from_pretrained) with
the demo's kind of forget set, for benches that time steps rather than what a model learned.

Not a bench script itself (the leading underscore): `python bench/NAME.py` imports it from beside it.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/NAME.py` puts bench/ first on the path, not the repository
    sys.path.insert(0, str(ROOT))

CACHE = Path(tempfile.gettempdir()) / "unlearn-bench"


def alternate(sides: dict[str, Callable[[], float]], repeat: int, warm: bool = True) -> dict[str, list[float]]:
    """Each side's measurement `repeat` times, the sides taking turns (a busy moment of the machine
    hits every side alike). A side returns the figure it measured (seconds, or seconds per step).
    `warm` runs every side once first, uncounted."""
    if warm:
        for run in sides.values():
            run()
    out: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            out[name].append(run())
    return out


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def ratio_pass(ratio: float | None, target: float, at_most: bool = True) -> bool:
    """Whether `ratio` meets `target` (≤ it when `at_most`, else ≥ it); no figure never passes."""
    if ratio is None or ratio != ratio:
        return False
    return ratio <= target if at_most else ratio >= target


def finish(report: dict, as_json: bool) -> int:
    """Print the report as the last stdout line (with --json) and return the exit status: 0 when it
    passes (or was skipped: pass None), 1 otherwise."""
    for key in ("name", "ratio", "target", "pass"):
        if key not in report:
            raise KeyError(f"a bench report needs {key!r}")
    if as_json:
        print(json.dumps(report), flush=True)
    return 0 if report["pass"] is not False else 1


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spread(name: str, values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    """One line: the median and the range of one side's figures."""
    return (f"  {name:<34} median {statistics.median(values) * scale:9.4f} {unit}  "
            f"(min {min(values) * scale:.4f}, max {max(values) * scale:.4f}, n={len(values)})")


def tiny_workspace(folder: Path, hidden: int = 128, layers: int = 4, heads: int = 4, seq_len: int = 128,
                   people: tuple[int, int, int] = (32, 64, 32), seed: int = 0):
    """A tokenizer and a random-weight Llama of the given size saved under `folder` (reused when it is
    there), and the demo's kind of forget set (fictitious people's records; stdlib code as general).
    Returns (model folder, ForgetSetTexts, ForgetSetChunks)."""
    import torch
    from transformers import LlamaForCausalLM

    from engine.data import chunk_forget_set, load_forget_set
    from engine.demo import person_record, stdlib_code, train_tokenizer
    from engine.models import load_tokenizer, tiny_llama_config

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = [person_record(rng, n) for n in rng.sample(range(10000, 99999), sum(people))]
    a, b = people[0], people[0] + people[1]
    roles = {"forget": records[:a], "retain": records[a:b], "unseen": records[b:], "general": stdlib_code(people[0])}
    files = {}
    for role, texts in roles.items():
        files[role] = folder / f"{role}.jsonl"
        files[role].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model_dir = folder / f"model-h{hidden}-l{layers}-s{seq_len}"
    if not (model_dir / "config.json").is_file():
        tok = train_tokenizer(records + roles["general"], 512)
        torch.manual_seed(seed)
        config = tiny_llama_config(len(tok), hidden, layers, heads, max_positions=seq_len,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(model_dir)
    texts = load_forget_set([str(files["forget"])], [str(files["retain"])], [str(files["unseen"])],
                            [str(files["general"])])
    sets = chunk_forget_set(texts, load_tokenizer(str(model_dir)), seq_len)
    return model_dir, texts, sets


def demo_workspace(workspace: Path | None = None):
    """The quick demo workspace (built once, about a minute on two cores; reused while its recipe is
    unchanged): (model folder, ForgetSetTexts, ForgetSetChunks at the recipe's seq_len)."""
    from engine.data import chunk_forget_set, load_forget_set
    from engine.demo import QUICK, build_workspace, demo_sources
    from engine.models import load_tokenizer

    ws = (workspace or CACHE / "demo-quick").resolve()
    build_workspace(ws, QUICK)
    src = demo_sources(ws)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"])
    return ws / "model", texts, chunk_forget_set(texts, load_tokenizer(str(ws / "model")), QUICK.seq_len)
