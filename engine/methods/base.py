"""The parts a method is made of: a forget term, an optional retain term, and a retain source.

A method = forget term + weight × retain term (docs/concepts.md#methods). Terms are small objects, so a new
method is a new composition in one file, never a branch in the training loop. How the two losses become
a step is the method's update rule (`UpdateRule`): by default one backward of their weighted sum; GRU and
PDU bring their own.

Conventions shared by every term: `labels` are aligned with `input_ids` (HF style: labels[t]
is the token predicted from positions < t), -100 where nothing is predicted (pad, position 0)
or nothing is scored (the prompt of a question–answer chunk: its `loss_mask` is 0 there). Every
loss reads which tokens count from `labels`, never from the attention mask, so a question–answer
set trains and scores its answers only; for plain text the loss mask is the attention mask.

Importing a method costs no torch: `unlearn methods` and the study spec read the registry on the
CLI's light read path, so the few functions that need torch's own functions import it inside.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    import torch

IGNORE = -100


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain next-token labels: the input itself, pad positions ignored, and with a `loss_mask`
    (Chunks.loss_mask) every position it leaves out ignored too (a QA chunk's prompt)."""
    return input_ids.masked_fill((attention_mask if loss_mask is None else loss_mask) == 0, IGNORE)


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at t predict labels at t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every predicted (non-ignored) token of the batch."""
    import torch.nn.functional as F

    lg, lb = shift(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1), ignore_index=IGNORE)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) per sequence, [batch]."""
    import torch

    lg, lb = shift(logits, labels)
    logp = torch.log_softmax(lg.float(), dim=-1)
    mask = lb != IGNORE
    tok = logp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def special_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


def model_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@dataclass
class PrepareContext:
    """What a term may use once, before the first step: the original model θ0 (the model itself,
    before any step, in eval mode), the tokenizer, a seeded generator (so prepared labels are
    identical across runs) and a device."""

    reference: Any  # θ0, a causal LM: read under no_grad, never trained here
    tokenizer: Any
    generator: torch.Generator
    device: torch.device
    batch_size: int = 8
    autocast: Any = field(default=contextlib.nullcontext)  # a context-manager factory for the reference forward
    # Where a term may keep what it builds once per (model, forget set, settings) — WHP's reinforced
    # model — and the key that names this run's model and forget set there; None: build in memory.
    cache_dir: Any = None
    cache_key: str = ""
    train_batch_size: int = 4
    seed: int = 0
    seq_len: int | None = None  # the run's --seq-len: the longest sequence a term may prepare (None: no limit)


def chunk_batches(input_ids, attention_mask, ctx: PrepareContext, trim: bool = False):
    """(row slice, input_ids, attention_mask) of every batch of `ctx.batch_size` chunks, on the
    device, for a `prepare` that reads θ0 over a whole set; `trim` drops all-pad columns (as the
    training batches do), otherwise every batch keeps the chunks' full width."""
    for start in range(0, len(input_ids), ctx.batch_size):
        sl = slice(start, start + ctx.batch_size)
        ids, mask = input_ids[sl], attention_mask[sl]
        if trim:
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        yield sl, ids.to(ctx.device), mask.to(ctx.device)


class Tunable:
    """Something with knobs: hyperparameters a study may sweep (`--param NAME=V1,V2`), set by __init__
    under the same keyword names. Shared, so never mutated: `with_knobs` makes a new one."""

    knobs: ClassVar[tuple[str, ...]] = ()

    def knob_values(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.knobs}

    def with_knobs(self, **values: float):
        """A new one of the same kind with some knobs changed."""
        return type(self)(**{**self.knob_values(), **values}) if values else self


class Term(Tunable):
    """What forget and retain terms share: the data they prepare once and how they reach a loss.

    `prepare` runs once over all chunks of the term's set and returns per-chunk tensors (dim 0 is
    the chunk; a tensor of two or more dims is token-aligned, dim 1 the position, and is trimmed
    with the batch's padding); a batch dict then carries those rows. A term may prepare a second
    sequence per chunk beside it (DPO's chosen answer): tensors named `<name>_...` where
    `<name>_attention_mask` is prepared too are that sequence's, and are trimmed by the width of
    `<name>_attention_mask` on the batch's rows instead of the chunks' own. `constants` are run-level
    tensors (not per chunk) put whole into every batch. `forward_loss` is what the training loop
    calls; most terms only need the logits and define `loss`, which reads the logits of
    `model_inputs(batch)` (the batch's own chunks, unless the term scores another sequence); a term
    that reads hidden states (RMU) overrides `forward_loss` itself."""

    id: ClassVar[str]
    formula: ClassVar[str]
    # The training loop keeps a live frozen copy of θ0 for terms whose loss reads its logits at
    # every step (a copy of the whole model: it costs memory; `prepare` needs no copy).
    needs_reference_logits: ClassVar[bool] = False
    # Sequences the model reads per batch row for this term (DPO: the forget chunk and a chosen
    # answer, 2); `unlearn plan` counts activations and logits by it.
    sequences: ClassVar[int] = 1

    # A loss that is a mean of per-chunk figures (NPO, SimNPO, a DPO pair) rather than of tokens.
    mean_over_chunks: ClassVar[bool] = False

    def mean_count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many items this batch's loss is a mean over (a 0-dim tensor): its predicted tokens, or its
        rows where `mean_over_chunks`. A run split over N processes weighs each process's loss by its
        share of the step's count (engine.run), so the step is the one a single process takes on the
        whole batch, whatever N."""
        labels = batch["labels"]
        return labels.new_tensor(labels.shape[0]) if self.mean_over_chunks else (labels[:, 1:] != IGNORE).sum()

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ctx: PrepareContext,
                loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`loss_mask` (the chunks' own; None: the attention mask) says which tokens the labels score."""
        return {"labels": causal_labels(input_ids, attention_mask, loss_mask)}

    def constants(self, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return {}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model reads for this term's loss (`input_ids`, `attention_mask`): the batch's own
        chunks. A term that scores another sequence (a chosen answer) returns that one, with the
        `labels` aligned with it."""
        return batch

    def forward_loss(self, model, batch: dict[str, torch.Tensor], reference=None) -> torch.Tensor:
        inputs = self.model_inputs(batch)
        reference_logits = None
        if self.needs_reference_logits:
            import torch

            with torch.no_grad():
                reference_logits = model_logits(reference, inputs)
        return self.loss(model_logits(model, inputs), batch, reference_logits)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], reference_logits: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class ForgetTerm(Term):
    """Loss on a forget batch."""

    prepare_reads_reference: ClassVar[bool] = False  # `prepare` reads θ0 (labels or log-probs computed once)
    # A term whose cells report an edit of the trained weights rather than the weights
    # themselves (task arithmetic): the run keeps θ0's weights and asks `edited` at each milestone.
    edits_weights: ClassVar[bool] = False

    def edited(self, model, theta0: dict):
        """The model a cell reports, built from the trained `model` and θ0's weights."""
        return model


class RetainTerm(Term):
    """Loss on a retain-source batch."""


@dataclass
class UpdateContext:
    """What an update rule may touch on a run, made once by the training loop (engine/run.py `_Run.set_up`)."""

    accelerator: Any  # backward(loss); num_processes
    model: Any  # as the accelerator prepared it (data parallel: wrapped; --fsdp: sharded in place)
    params: list  # the parameters the optimizer steps (--fsdp: this process's shards of them)
    forget_weight: float
    retain_weight: float  # the run's: --retain-weight, else the method's
    sharded: bool = False  # --fsdp: each process holds 1/N of every gradient
    forget_chunks: int = 1  # len(U): with `global_batch`, how many steps make a pass over the forget set
    global_batch: int = 1  # forget rows a step trains on, over every process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


class UpdateRule(Tunable):
    """How a step's forget loss L_f and retain loss L_r become the gradients the optimizer steps on:
    the one place a method may change the update itself, not only its loss (GRU rectifies the
    forget gradient, PDU moves a dual variable). The loop calls, per run, `start` (the rule's state:
    it lives in the run, never in the shared Method), and per step `forward_context` around both
    forward passes, `loss` (the step's reported loss, train_loss), then `backward`, which leaves
    each trained parameter's gradient in `.grad`; the loop then clips to 1.0 and steps.

    This default is every other method's step: one backward of forget_weight·L_f + retain_weight·L_r,
    the arithmetic written as the loop always wrote it (a weight of 1.0 multiplies nothing), so the
    figures stay the same bit for bit."""

    id: ClassVar[str] = "sum"
    formula: ClassVar[str] = "∇(w_f·L_f + w_r·L_r)"
    # Gradient-sized buffers the rule holds beside `.grad` at its peak, at worst (engine/plan.py counts them).
    gradient_copies: ClassVar[int] = 0

    def start(self, ctx: UpdateContext) -> Any:
        """The rule's state for one run (None: it keeps none); fresh per run, so runs never share it."""
        return None

    def forward_context(self, ctx: UpdateContext) -> contextlib.AbstractContextManager:
        """Around each forward pass of a step (a rule that needs each gradient alone turns off data
        parallel's one reduction per backward here)."""
        return contextlib.nullcontext()

    def loss(self, forget: torch.Tensor, retain: torch.Tensor | None, ctx: UpdateContext, state: Any) -> torch.Tensor:
        """The step's loss as reported (and, by this default, differentiated): `forget` and `retain`
        are the terms' own losses, unweighted; `retain` is None for a method without a retain term."""
        loss = forget if ctx.forget_weight == 1.0 else ctx.forget_weight * forget
        if retain is not None:
            loss = loss + (retain if ctx.retain_weight == 1.0 else ctx.retain_weight * retain)  # × 1.0 is exact
        return loss

    def backward(self, loss: torch.Tensor, forget: torch.Tensor, retain: torch.Tensor | None, ctx: UpdateContext,
                 state: Any) -> None:
        """Leave the step's gradient in each trained parameter's `.grad` (they start empty)."""
        ctx.accelerator.backward(loss)


SUM = UpdateRule()


def variant_id(base: str, values: dict[str, float]) -> str:
    """'npo' + {beta: 0.2} -> 'npo[beta=0.2]': one canonical name per method and knob values, so a
    study's runs, cells, heatmaps and Optuna trials tell the variants apart with no other column."""
    return f"{base}[{','.join(f'{k}={float(values[k])!r}' for k in sorted(values))}]" if values else base


def parse_variant(method_id: str) -> tuple[str, dict[str, float]]:
    """'npo[beta=0.2]' -> ('npo', {'beta': 0.2}); a plain id -> (id, {})."""
    from engine.errors import UnlearnError

    if "[" not in method_id:
        return method_id, {}
    base, _, rest = method_id.partition("[")
    if not rest.endswith("]"):
        raise UnlearnError(f"method {method_id!r}: knobs go in brackets, e.g. npo[beta=0.2]")
    values = {}
    for part in filter(None, (p.strip() for p in rest[:-1].split(","))):
        k, eq, v = part.partition("=")
        try:
            values[k.strip()] = float(v)
        except ValueError:
            raise UnlearnError(f"method {method_id!r}: knob {part!r} must be NAME=NUMBER") from None
        if not eq:
            raise UnlearnError(f"method {method_id!r}: knob {part!r} must be NAME=NUMBER")
    return base.strip(), values


@dataclass(frozen=True)
class Method:
    """forget_weight × forget term + retain_weight × retain term on the retain source; `trains`
    names the parameters a method may change (None: all of them)."""

    id: str
    description: str
    forget: ForgetTerm
    retain: RetainTerm | None = None
    retain_source: str | None = None  # "retain" or "general"
    retain_weight: float = 1.0
    forget_weight: float = 1.0
    trains: Callable[[Any], Callable[[str], bool]] | None = None  # model -> is this parameter name trained?
    trains_text: str | None = None  # what `trains` selects, in words
    # The % of weights trained, chosen by saliency on U at θ0 (engine/selection.py); 0: no such
    # choice (all weights, or the method's own). A knob of every method, so a study can sweep it.
    saliency: float = 0.0
    # How the two losses become a step (GRU, PDU change it); the default backprops their weighted sum.
    update: UpdateRule = SUM

    def knob_values(self) -> dict[str, float]:
        """Every hyperparameter a study may sweep for this method, with its value here."""
        out = {**self.forget.knob_values(), **self.update.knob_values(), "forget_weight": float(self.forget_weight)}
        if self.retain is not None:
            out.update(self.retain.knob_values(), retain_weight=float(self.retain_weight))
        return {**out, "saliency": float(self.saliency)}

    def with_knobs(self, values: dict[str, float]) -> "Method":
        """This method with some knobs changed, named `id[k=v,...]` (the knobs sorted by name)."""
        if not values:
            return self
        from dataclasses import replace

        from engine.errors import UnlearnError

        known = self.knob_values()
        for k, v in values.items():
            if k not in known:
                raise UnlearnError(f"method {self.id} has no knob {k!r}; its knobs: {', '.join(sorted(known))}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
                raise UnlearnError(f"knob {k} of {self.id} must be a finite number, not {v!r}")
            if k.endswith("_weight") and v < 0:
                raise UnlearnError(f"knob {k} of {self.id} must be 0 or more, not {v:g}")
            if k == "saliency" and not 0 <= v <= 100:
                raise UnlearnError(f"knob saliency of {self.id} is a share in percent: 0 (off) to 100, not {v:g}")
        f = {k: v for k, v in values.items() if k in self.forget.knobs}
        r = {k: v for k, v in values.items() if self.retain is not None and k in self.retain.knobs}
        u = {k: v for k, v in values.items() if k in self.update.knobs}
        return replace(self, id=variant_id(self.id, values), forget=self.forget.with_knobs(**f),
                       retain=self.retain.with_knobs(**r) if self.retain is not None else None,
                       update=self.update.with_knobs(**u),
                       forget_weight=float(values.get("forget_weight", self.forget_weight)),
                       retain_weight=float(values.get("retain_weight", self.retain_weight)),
                       saliency=float(values.get("saliency", self.saliency)))

    @property
    def needs_reference_logits(self) -> bool:
        """Whether a term reads θ0's logits at every step, so a run keeps a live frozen θ0 beside the
        model it trains (with LoRA: the model with its adapter switched off)."""
        return self.forget.needs_reference_logits or bool(self.retain and self.retain.needs_reference_logits)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "forget_term": self.forget.formula,
            "retain_term": (self.retain.formula.replace("; R)", "; G)") if self.retain_source == "general" else self.retain.formula) if self.retain else None,
            "retain_source": self.retain_source,
            "retain_weight": self.retain_weight if self.retain else None,
            "forget_weight": self.forget_weight,
            "trains": (f"the {self.saliency:g} % most salient weights (saliency on U at θ0)" if self.saliency
                       else self.trains_text or "all parameters"),
            "knobs": self.knob_values(),
            "description": self.description,
            # only where a method changes the update (the default's step is the sum's gradient)
            **({"update": self.update.formula} if type(self.update) is not UpdateRule else {}),
        }
