"""The engine on a GPU: a ~1B-parameter Llama-style model (random weights, built from a LlamaConfig,
saved and loaded with from_pretrained), ga_gd, fp32 master weights under bf16 autocast (the
engine's CUDA setting), against a `transformers.Trainer` subclass doing the same (bench/step_overhead.py's,
bf16=True): tokens per second, model FLOPs utilisation and peak memory.

    python bench/gpu.py [--steps 10] [--batch-size 4] [--seq-len 2048] [--repeat 3] [--json]

Tokens per second count the forget and the retain batch of every step (their attention masks);
the time per step runs from the end of step 1 to the end of the last (model loading, set-up and the
engine's evaluation at the milestone are outside it). MFU = 6 · N · tokens/s over the GPU's peak
bf16 FLOP/s, which is measured in the same run: the best of several 8192² bf16 matmuls. The two
sides run alternately, --repeat times; medians are compared. Targets: MFU ≥ 40 % and the engine's
tokens/s above the Trainer's.

Without CUDA it prints why and {"pass": null, "skipped": reason} and exits 0. `--device cpu --tiny`
(for the tests) runs the same code on a tiny config on the CPU; its figures mean nothing.
With --json the last line is {"name", "ratio", "target", "pass", ...}; it exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, finish, medians, spread  # noqa: E402

MFU_TARGET = 0.40
NAME = "gpu"
# ~1.0B parameters: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192)
# with a 32,000-token vocabulary, embeddings tied.
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def skip_reason(device: str) -> str | None:
    """Why the bench cannot run on `device`, or None."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def skipped_report(reason: str) -> dict:
    return {"name": NAME, "ratio": None, "target": MFU_TARGET, "pass": None, "skipped": reason}


def mfu(n_params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: 6·N FLOPs per trained token (forward and backward), over the peak."""
    return 6 * n_params * tokens_per_s / peak_flops


def verdict(mfu_engine: float, tps_engine: float, tps_trainer: float) -> bool:
    return mfu_engine >= MFU_TARGET and tps_engine > tps_trainer


def peak_matmul_flops(device, n: int, dtype, tries: int = 5, iters: int = 10) -> float:
    """The best FLOP/s of `iters` n×n @ n×n matmuls in `dtype`, over `tries` (warm-up first)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(tries):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def random_sets(vocab: int, seq_len: int, batch_size: int, seed: int = 0):
    """Forget and retain sets of 4 batches of random token ids each, 8 unseen chunks: enough for the
    batch stream, and the milestone's evaluation stays short."""
    import torch

    from engine.data import Chunks, ForgetSetChunks

    g = torch.Generator().manual_seed(seed)

    def chunks(n):
        ids = torch.randint(3, vocab, (n, seq_len), generator=g)
        return Chunks(ids, torch.ones_like(ids), [""] * n, list(range(n)))

    return ForgetSetChunks(chunks(4 * batch_size), chunks(4 * batch_size), chunks(8), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="chunks per term (forget, retain) per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    reason = skip_reason(a.device)
    if reason:
        print(f"skipped: {reason}")
        return finish(skipped_report(reason), a.json)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import step_overhead
    from engine.models import quiet_transformers

    quiet_transformers()
    device = torch.device(a.device)
    if a.tiny:
        a.seq_len, a.batch_size, a.steps, a.repeat = 32, 2, 3, 1
    shape = TINY if a.tiny else ONE_B
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    config = LlamaConfig(**shape, max_position_embeddings=a.seq_len, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)  # random weights, fp32 on disk: the engine loads fp32 masters
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    sets = random_sets(shape["vocab_size"], a.seq_len, a.batch_size)
    tokens_per_step = 2 * a.batch_size * a.seq_len
    peak = peak_matmul_flops(device, 256 if a.tiny else 8192, torch.float32 if device.type == "cpu" else torch.bfloat16)
    memory: dict[str, list[float]] = {"engine": [], "trainer": []}

    def clock() -> float:
        """The wall clock once the GPU has finished what was queued: a step's end is when its
        kernels end (step_overhead's default, the process's CPU time, would count only the host)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def side(name):
        run = step_overhead.run_engine if name == "engine" else step_overhead.run_trainer

        def go():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds, _ = step_overhead.timed_run(run, folder, sets, "ga_gd", a.lr, a.steps, a.batch_size, 0,
                                                 device=str(device), clock=clock)
            if device.type == "cuda":
                memory[name].append(torch.cuda.max_memory_allocated(device) / 2 ** 30)
            return seconds
        return go

    times = alternate({"engine": side("engine"), "trainer": side("trainer")}, a.repeat, warm=not a.tiny)
    shutil.rmtree(folder, ignore_errors=True)  # the saved weights (4 GB in fp32 for 1B)
    med = medians(times)
    tps = {k: tokens_per_step / v for k, v in med.items()}
    util = {k: mfu(n_params, v, peak) for k, v in tps.items()}
    peak_gib = {k: (max(v) if v else None) for k, v in memory.items()}
    ok = verdict(util["engine"], tps["engine"], tps["trainer"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{n_params / 1e9:.3f}B parameters ({'tiny' if a.tiny else '1B'} Llama), ga_gd, {a.batch_size}+{a.batch_size} × "
          f"{a.seq_len} tokens a step, {a.steps} steps, on {name}; peak matmul {peak / 1e12:.1f} TFLOP/s")
    for k, v in times.items():
        print(spread(k, v, "s/step"))
        print(f"    {tps[k]:,.0f} tokens/s, MFU {util[k]:.1%}, peak memory "
              f"{'—' if peak_gib[k] is None else f'{peak_gib[k]:.1f} GiB'}")
    print(f"engine / Trainer tokens/s {tps['engine'] / tps['trainer']:.3f}; MFU target ≥ {MFU_TARGET:.0%}: "
          f"{'pass' if ok else 'MISSED'}")
    return finish({"name": NAME, "ratio": util["engine"], "target": MFU_TARGET,
                   "target_is": "engine MFU ≥ 0.40 (ratio) and engine tokens/s above the Trainer's",
                   "pass": ok, "tokens_per_s": tps, "mfu": util, "peak_memory_gib": peak_gib,
                   "speedup_vs_trainer": tps["engine"] / tps["trainer"], "peak_flops": peak,
                   "parameters": n_params, "seconds_per_step": med, "device": name, "tiny": a.tiny,
                   "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "repeat": a.repeat}, a.json)


if __name__ == "__main__":
    sys.exit(main())
