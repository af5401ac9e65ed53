"""`unlearn plan`: the GPU memory a run needs, per GPU, from the model's config alone (no weights).

Figures, in bytes per GPU, for P parameters (engine.plan_shape counts them), T of them trained (all;
RMU: the MLP output projections of its 3 layers), A adapter parameters with LoRA (r·(in + out) per
adapted linear layer per block), N GPUs (FSDP full shard when N > 1), w = bytes of a weight (fp32 4,
bf16 2):

    weights     one GPU: P·w. N > 1 (FSDP, engine/sharding.py): fp32 shards, P·4 / N, + 2 × the largest
                FSDP unit (a block or the embedding matrix) in w (the all-gathered layer being computed
                and the prefetched next one). LoRA: the frozen base as above + the adapter A·4 (peft
                keeps adapters in fp32)
    master      bf16 full training with AdamW on one GPU: an fp32 copy of the trained weights, 4·T
                (small learning rates move it, then it is rounded into the bf16 weights); fp32, LoRA,
                the 8-bit optimizers (bitsandbytes updates bf16 weights in place) and FSDP (its fp32
                shards are the master): none
    gradients   T·w (bf16 gradients with bf16 weights); FSDP: fp32, T·4 / N; LoRA: A·4; × (1 + c) for a
                method whose update rule holds c more gradient-sized buffers (gru: its running retain
                gradient and the retain gradient beside the forget one, c = 2)
    optimizer   AdamW's two fp32 moments 8·T / N; 8-bit (bitsandbytes adamw8bit, paged_adamw8bit): 2·T / N
                (its block statistics, < 0.5 %, left out; a paged state can spill to host memory under
                pressure, the plan counts it resident); LoRA: 8·A or 2·A
    reference   a method whose loss reads θ0's logits every step (ga_kl, npo_kl, undial...): a live
                frozen copy, P·w (FSDP: sharded like the weights, P·4 / N); LoRA: 0 (θ0 is the model
                with its adapter disabled). A method that reads θ0 once in `prepare` (npo,
                adversarial) keeps per-chunk numbers on the CPU: 0. whp trains a reinforced copy
                in `prepare`: P·w / N more at that moment. task_vector keeps θ0's trained weights:
                T·w / N. LoRA: 0 for all of them.
    activations B·S·p tokens (B = --batch-size rows per GPU, S = --seq-len, p = 2 when the method has a
                retain term: its graph and the forget batch's are both alive at backward, else 1; a
                term that reads two sequences a row, DPO's, counts twice), per token:
                  no checkpointing:  L·a + e
                  checkpointing:     L·x + e, + B·S·a once (the block recomputed during backward)
                a = 16h + 4q + 4k + 8i + 8 + 4n bytes a block saves for backward (gated MLP; 4i when not
                    gated), + 10h with fp32 weights (fp32 norms and residual stream under bf16 autocast),
                    + 2r per adapted linear with LoRA (the adapter's r-wide intermediate);
                x = the block's input, 2h (4h with fp32 weights); e = 6h + 12 + 2d (8h + 12 + 4d in fp32)
                for the embeddings' ids, the final norm and the rotary tables;
                h hidden, q = n·d query width, k key-value width, i MLP width, n heads, d head dim, L blocks.
                Measured (exactly, on CPU, with torch.autograd saved-tensor hooks) on Llama blocks with
                SDPA attention, which on CUDA saves what flash attention saves: q, k, v, output, log-sum-exp.
    autocast    fp32 weights only: bf16 autocast keeps a bf16 cast of every linear weight the graph used
                until backward, 2·(L·Σ in·out + V·h) per forward (one per term: p, DPO's too)
    logits      B·S·V per term × (4 saved + 6 at the peak) bytes for a cross-entropy term (the fp32
                log-softmax it keeps; the bf16 logits and their fp32 copy while it is computed); a KL or
                self-distillation term: 12 saved (log p, p0 and log p0 − log p) + 20 at the peak (both
                models' bf16 and fp32 logits); a hidden-state term (RMU): 0 saved + 2 at the peak (the
                logits the model computes anyway); × 2 for a term that reads two sequences a row (DPO).
                Total: Σ saved + the largest peak.
    overhead    1.5 GiB, a constant: the CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack.

Option sets, ordered from the least to the most cost to fidelity (the search takes the first that fits):
fp32 full (the weights, gradients and AdamW of the original loop) > bf16 with an fp32 master copy >
+ gradient checkpointing (recomputes, changes nothing) > + 8-bit AdamW (quantized moments) > LoRA r=16
(an adapter instead of every weight) > LoRA r=16 + checkpointing > LoRA r=16 + checkpointing + 8-bit.
`--gpus` is never changed by the search: the plan is for the GPUs at hand. Over several GPUs (a run
sharded with --fsdp) the 8-bit sets are left out: FSDP does not run bitsandbytes' optimizers yet.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.errors import UnlearnError
from engine.plan_shape import ModelShape, read_config, shape_of

GIB = 1024 ** 3
OVERHEAD = int(1.5 * GIB)
DTYPES = ("fp32", "bf16", "auto")
OPTIMS = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}  # optimizer bytes per trained parameter
ROWS = ("weights", "master", "gradients", "optimizer", "reference", "activations", "autocast", "logits", "overhead")


@dataclass(frozen=True)
class Options:
    """The memory options of a run (the flags of `unlearn run` and a study's spec)."""

    dtype: str = "bf16"  # "auto" is bf16: the plan is for CUDA GPUs
    gradient_checkpointing: bool = False
    optim: str = "adamw"
    lora: int = 0  # adapter rank; 0: every weight trains
    lora_targets: tuple[str, ...] = ()  # () = every linear layer of a block
    gpus: int = 1

    def checked(self) -> "Options":
        if self.dtype not in DTYPES:
            raise UnlearnError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.optim not in OPTIMS:
            raise UnlearnError(f"--optim must be one of {', '.join(OPTIMS)}, not {self.optim!r}")
        if self.lora < 0:
            raise UnlearnError(f"--lora must be a rank of 1 or more (0: no adapter), not {self.lora}")
        if self.gpus < 1:
            raise UnlearnError(f"--gpus must be at least 1, not {self.gpus}")
        return replace(self, dtype="bf16") if self.dtype == "auto" else self

    def flags(self) -> str:
        out = [f"--dtype {self.dtype}"]
        if self.gradient_checkpointing:
            out.append("--gradient-checkpointing")
        if self.optim != "adamw":
            out.append(f"--optim {self.optim}")
        if self.lora:
            out.append(f"--lora {self.lora}" + (f" --lora-targets {','.join(self.lora_targets)}" if self.lora_targets else ""))
        if self.gpus > 1:
            out.append(f"--gpus {self.gpus}")
        return " ".join(out)


LADDER = (Options("fp32"), Options("bf16"), Options("bf16", True), Options("bf16", True, "adamw8bit"),
          Options("bf16", lora=16), Options("bf16", True, lora=16), Options("bf16", True, "adamw8bit", lora=16))


def options_from(settings, gpus: int = 1) -> Options:
    """The options a RunSettings (or RunConfig) carries, read by attribute name with these defaults:
    dtype "auto", gradient_checkpointing False, optim "adamw", lora 0, lora_targets "" (comma-separated)."""
    targets = getattr(settings, "lora_targets", "") or ""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return Options(getattr(settings, "dtype", "auto") or "auto", bool(getattr(settings, "gradient_checkpointing", False)),
                   getattr(settings, "optim", "adamw") or "adamw", int(getattr(settings, "lora", 0) or 0),
                   tuple(targets), gpus).checked()


def _terms(method):
    return [t for t in (method.forget, method.retain) if t is not None]


def _logit_bytes(term) -> tuple[int, int]:
    """(bytes kept until backward, bytes at its peak) per row · position · vocabulary entry."""
    from engine.methods.base import Term

    if type(term).forward_loss is not Term.forward_loss:
        return 0, 2  # reads hidden states (RMU); the model still computes bf16 logits
    return (12, 20) if term.needs_reference_logits else (4, 6)


def _trained_linears(shape: ModelShape, method) -> tuple[int, tuple]:
    """(blocks, linear layers) a method trains: RMU its 3 blocks' MLP output projection, others all."""
    from engine.methods.rmu import RMU_TRAINED_LAYERS, trains_down_projections

    if method.trains is trains_down_projections:
        return min(RMU_TRAINED_LAYERS, shape.layers), shape.linears[-1:]
    return shape.layers, shape.linears


def adapter_params(shape: ModelShape, method, opts: Options) -> int:
    """A: r·(in + out) for every adapted linear layer (--lora-targets: names or name endings)."""
    layers, linears = _trained_linears(shape, method)
    if opts.lora_targets:
        names = [n for n, _, _ in shape.linears]
        for t in opts.lora_targets:
            if not any(n == t or n.endswith("." + t) or n.endswith(t) for n in names):
                raise UnlearnError(f"--lora-targets: {shape.model_type} has no linear layer {t!r}; its layers: {', '.join(names)}")
        linears = [x for x in linears if any(x[0] == t or x[0].endswith(t) for t in opts.lora_targets)]
    return layers * sum(opts.lora * (a + b) for _, a, b in linears)


def figures(shape: ModelShape, method, opts: Options, batch_size: int, seq_len: int) -> dict[str, int]:
    """Bytes per GPU of every row of the module docstring's table, for one option set."""
    opts = opts.checked()
    N, P, w = opts.gpus, shape.params, 2 if opts.dtype == "bf16" else 4
    h, L = shape.hidden, shape.layers
    blocks, linears = _trained_linears(shape, method)
    T = P if blocks == L and linears == shape.linears else blocks * sum(a * b for _, a, b in linears)
    A = adapter_params(shape, method, opts) if opts.lora else 0
    f = dict.fromkeys(ROWS, 0)
    ws = 4 if N > 1 else w  # bytes a stored weight takes: FSDP keeps fp32 shards and computes in w
    f["weights"] = P * ws // N + (2 * shape.largest_unit * w if N > 1 else 0) + 4 * A
    copies = 1 + method.update.gradient_copies
    if A:
        f["gradients"], f["optimizer"] = 4 * A * copies, OPTIMS[opts.optim] * A
    else:  # an fp32 master copy for bf16 weights (engine/precision.py); FSDP's fp32 shards are their own
        f["master"] = 4 * T if opts.dtype == "bf16" and opts.optim == "adamw" and N == 1 else 0
        f["gradients"], f["optimizer"] = T * ws // N * copies, OPTIMS[opts.optim] * T // N
        if method.needs_reference_logits or method.id == "whp":
            f["reference"] = P * ws // N
        elif method.forget.edits_weights:
            f["reference"] = T * ws // N
    passes = sum(t.sequences for t in _terms(method))  # DPO's forget term reads two sequences a row
    tokens = batch_size * seq_len * passes
    fp32 = opts.dtype == "fp32"
    a = 16 * h + 4 * shape.q_dim + 4 * shape.kv_dim + (8 if shape.gated else 4) * shape.intermediate + 8 + 4 * shape.heads
    a += 10 * h if fp32 else 0
    if A:
        a += 2 * opts.lora * len([x for x in shape.linears if not opts.lora_targets
                                  or any(x[0].endswith(t) for t in opts.lora_targets)])
    e = (8 * h + 12 + 4 * shape.head_dim) if fp32 else (6 * h + 12 + 2 * shape.head_dim)
    if opts.gradient_checkpointing:
        widest = max(t.sequences for t in _terms(method))  # rows of the largest forward (DPO: both sides)
        f["activations"] = tokens * (L * (4 if fp32 else 2) * h + e) + widest * batch_size * seq_len * a
    else:
        f["activations"] = tokens * (L * a + e)
    if fp32:
        f["autocast"] = 2 * (L * sum(x * y for _, x, y in shape.linears) + shape.vocab * h) * len(_terms(method))
    kept, peak = zip(*((t.sequences * k, t.sequences * p) for t in _terms(method) for k, p in [_logit_bytes(t)]))
    f["logits"] = batch_size * seq_len * shape.vocab * (sum(kept) + max(peak))
    f["overhead"] = OVERHEAD
    return f


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass
class Plan:
    model: str
    method: str
    shape: ModelShape
    batch_size: int
    seq_len: int
    gpu_bytes: int | None
    asked: Options
    asked_bytes: dict[str, int]
    ladder: list[tuple[Options, dict[str, int]]]

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else sum(self.asked_bytes.values()) <= self.gpu_bytes

    @property
    def recommended(self) -> tuple[Options, dict[str, int]] | None:
        if self.gpu_bytes is None:
            return None
        return next(((o, b) for o, b in self.ladder if sum(b.values()) <= self.gpu_bytes), None)

    def verdict(self) -> str:
        """One line: what the asked set needs against the GPU, and the option set that would fit."""
        need = sum(self.asked_bytes.values())
        if self.gpu_bytes is None:
            return f"needs {gib(need)} per GPU; no GPU detected (give --gpu-mem GiB to choose an option set)"
        rec = self.recommended
        head = (f"fits: needs {gib(need)} per GPU, the GPU has {gib(self.gpu_bytes)}" if self.fits else
                f"does not fit: needs {gib(need)} per GPU, the GPU has {gib(self.gpu_bytes)}")
        if rec is None:
            least = min(sum(b.values()) for _, b in self.ladder)
            return (f"{head}; no option set fits (the smallest needs {gib(least)}): lower --batch-size "
                    f"({self.batch_size}) or --seq-len ({self.seq_len}), or add GPUs")
        return f"{head}; would fit with: {rec[0].flags()}"

    def refusal(self) -> str | None:
        """The one line that refuses a run whose asked options do not fit (None when they do)."""
        return None if self.fits else f"model {self.model}, method {self.method}, {self.asked.flags()}: {self.verdict()}"

    def to_json(self) -> dict:
        rec = self.recommended
        return {"model": self.model, "method": self.method, "model_type": self.shape.model_type,
                "params": self.shape.params, "counted": self.shape.counted, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "gpus": self.asked.gpus, "gpu_bytes": self.gpu_bytes,
                "asked": {"options": self.asked.flags(), "bytes": self.asked_bytes,
                          "total": sum(self.asked_bytes.values()), "fits": self.fits},
                "recommended": None if rec is None else {"options": rec[0].flags(), "bytes": rec[1],
                                                         "total": sum(rec[1].values())},
                "ladder": [{"options": o.flags(), "total": sum(b.values()),
                            "fits": None if self.gpu_bytes is None else sum(b.values()) <= self.gpu_bytes}
                           for o, b in self.ladder],
                "fits": self.fits, "verdict": self.verdict()}


def make_plan(model: str, method: str, opts: Options, batch_size: int = 4, seq_len: int = 512,
              gpu_bytes: int | None = None, trust_remote_code: bool = False) -> Plan:
    """The plan for `model` (a local folder or hub id: its config.json only) and `method` (an id,
    variants allowed) at `batch_size` rows of `seq_len` tokens per GPU."""
    from engine.methods import get_method

    m = get_method(method)
    for name, v in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UnlearnError(f"{name} must be a positive integer, not {v!r}")
    if gpu_bytes is not None and gpu_bytes <= 0:
        raise UnlearnError(f"--gpu-mem must be above 0, not {gpu_bytes / GIB:g}")
    opts = opts.checked()
    if opts.gpus > 1 and opts.optim != "adamw":  # as a run with --fsdp refuses it (engine/config.py)
        raise UnlearnError(f"--optim {opts.optim} does not run sharded over --gpus {opts.gpus} (--fsdp) yet: "
                           "plan it for one GPU, or with --optim adamw")
    shape = shape_of(read_config(model, trust_remote_code), trust_remote_code)
    # Sharded over several GPUs (FSDP) the 8-bit optimizers do not run yet: those sets are left out.
    ladder = [replace(o, gpus=opts.gpus) for o in LADDER if opts.gpus == 1 or o.optim == "adamw"]
    ladder = [(o, figures(shape, m, o, batch_size, seq_len)) for o in ladder]
    return Plan(model, m.id, shape, batch_size, seq_len, gpu_bytes, opts,
                figures(shape, m, opts, batch_size, seq_len), ladder)


def detect_gpu_bytes() -> int | None:
    """Total memory of CUDA device 0 (torch.cuda.mem_get_info), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(0)[1])


def check_fits(model: str, method: str, settings, gpu_bytes: int, gpus: int = 1, trust_remote_code: bool = False) -> None:
    """For a run's worker, before it loads anything on a GPU: returns None when the run's options (read from
    `settings`, a RunSettings or RunConfig, with `options_from`) fit in `gpu_bytes` per GPU on
    `gpus` GPUs at settings.batch_size × settings.seq_len; otherwise raises UnlearnError with one
    line: "model M, method X, --dtype bf16 ...: does not fit: needs A GiB per GPU, the GPU has B GiB;
    would fit with: --dtype bf16 --gradient-checkpointing ..." (or what to lower when nothing fits)."""
    plan = make_plan(model, method, options_from(settings, gpus), settings.batch_size, settings.seq_len,
                     gpu_bytes, trust_remote_code)
    refusal = plan.refusal()
    if refusal:
        raise UnlearnError(refusal)


def describe_oom(model: str, method: str, settings, gpu_bytes: int | None, gpus: int = 1,
                 trust_remote_code: bool = False) -> str:
    """For recording a CUDA out-of-memory error: one line with the plan's figures for the run's options
    and the verdict (the option set that would fit). Never raises for a bad model or method: the
    reason it could not plan is the text then."""
    try:
        plan = make_plan(model, method, options_from(settings, gpus), settings.batch_size, settings.seq_len,
                         gpu_bytes, trust_remote_code)
    except UnlearnError as exc:
        return f"no plan: {exc}"
    rows = ", ".join(f"{k} {gib(v)}" for k, v in plan.asked_bytes.items() if v)
    return (f"plan for {model} / {plan.method} with {plan.asked.flags()} at batch {plan.batch_size} × "
            f"{plan.seq_len} tokens: {rows}; {plan.verdict()}")
