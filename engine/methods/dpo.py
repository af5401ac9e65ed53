"""DPO for unlearning: the forget answer is the rejected side of a preference pair (Rafailov et al. 2023,
"Direct Preference Optimization"; for unlearning with an "I don't know" as the chosen side, IdkDPO: Maini
et al. 2024, "TOFU", as open-unlearning cites it), as open-unlearning's `DPO` trainer runs it.

    L   = γ · L_f + α · CE(θ; R)
    L_f = −(2/β) · mean_i log σ(β · [(log π_θ(c_i) − log π_θ0(c_i)) − (log π_θ(r_i) − log π_θ0(r_i))])
    β = 0.1, γ (forget_weight) = 1, α (retain_weight) = 1, the retain term NLL on the retain set

r_i, the rejected sequence, is forget chunk i scored on its answer; c_i, the chosen one, is the same
prompt followed by another answer. log π(·) is summed over a sequence's answer tokens. π_θ0 is the
original model: its log-probs are two numbers per chunk, computed once in `prepare` (no live copy of the
model is kept). At θ = θ0 the loss is (2/β)·log 2. The sign convention: minimizing L_f widens the margin
log π_θ(c)/π_θ0(c) − log π_θ(r)/π_θ0(r), so it lowers the forget answers' likelihood relative to the
chosen ones'; each pair's push 2σ(−β·margin) fades once its margin is wide (NPO is this loss without a
chosen side).

The sides. A question–answer chunk is its question (prompt) then its answer; a plain-text chunk has no
prompt, so it is cut in halves: the first half is the prompt, the second the scored "answer" (the rejected
labels score the second half only, so that both sides are continuations of the same context; a chunk whose
only context is position 0 — an empty prompt — is cut the same way, so that it trains as the plain chunk
of the same tokens does). The chosen answer of
  - `dpo`: θ0's own greedy continuation of the prompt, as many tokens as the rejected answer (stopping
    after an end-of-sequence token), generated once in `prepare`, with the rejected answer's first token
    banned at the first position;
  - `idk_dpo`: a refusal ("I don't know." and 39 variants, engine/methods/refusals.txt) drawn per chunk
    with the run's seeded generator, tokenized after the prompt (cut at --seq-len).

Source: open-unlearning src/trainer/utils.py `compute_dpo_loss` (win = the alternate answer, lose = the
forget answer; `compute_batch_nll` sums the token NLL of each sequence; loss −(2/β)·mean logsigmoid(β·
(win_log_ratio − lose_log_ratio))), src/trainer/unlearn/dpo.py (`DPO(GradDiff)`: gamma·forget +
alpha·retain, retain NLL) and configs/trainer/DPO.yaml (beta 0.1, alpha 1.0, gamma 1.0, retain_loss_type
NLL; the class's own default beta is 1.0, the config's 0.1 is what a run uses and is kept here). Their
IdkDPO is that trainer on TOFU_QA_forget_idk (configs/experiment/unlearn/tofu/idk.yaml). (TOFU's own code,
locuslab/tofu dataloader.py loss_type "dpo", has β = 0.1 without the 2/β scale and no retain term: the
2/β makes the push at θ0 that of ascent on the summed log-likelihood ratio, NPO's scale.)

What differs, and why:
  - the refusal is drawn once per chunk, seeded, where open-unlearning's dataset (`QAwithIdkDataset`)
    draws a fresh one each time a row is read: a run is then a function of its seed, and the prefix
    property (a run to step 2 passes through the run to step 1) holds;
  - their alternate answer is an "I don't know" for IdkDPO and must be supplied otherwise; `dpo` makes one
    from θ0 itself, so a forget set needs nothing beside its texts. θ0's greedy continuation of a memorized
    prompt is the memorized answer itself, and with identical sides the margin is 0 at every θ — no
    gradient at all — so the first answer token is banned: the chosen side is then never the rejected one;
  - the plain-text halves (open-unlearning's DPO is for question–answer data only);
  - `dpo`'s chosen answers are generated once, before the first step, with transformers' greedy
    `generate` and its key-value cache (`greedy_answers`), left-padded batches of the eval batch size;
  - the two sides are one forward pass of 2B rows (both right-padded to the wider side), their two
    forwards in open-unlearning; logits are read in float32.
"""
from __future__ import annotations

from engine.data import pad_id
from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, causal_labels, sequence_logprob
from engine.methods.npo import reference_logprobs
from engine.methods.retain_terms import RetainDescent

DPO_BETA = 0.1
DPO_FORGET_WEIGHT = 1.0  # open-unlearning's gamma
DPO_RETAIN_WEIGHT = 1.0  # open-unlearning's alpha
CHOSEN = "chosen"  # the second sequence's name: chosen_input_ids, chosen_attention_mask, chosen_labels


# ------------------------------------------------------------------ the two sides of a chunk

def prompt_lengths(attention_mask, loss_mask=None):
    """(p, n) per chunk, [N] each: the prompt is tokens [0, p), the answer [p, n), n the real tokens.
    A question–answer chunk's prompt is what precedes its first scored token; a chunk scored from
    position 1 on (plain text, or an empty prompt: position 0 is never predicted) is cut in halves."""
    import torch

    n = attention_mask.sum(1)
    scored = (attention_mask if loss_mask is None else loss_mask).clone().bool()
    scored[:, 0] = False  # position 0 is never predicted, so it is never the answer's start
    first = torch.where(scored.any(1), scored.int().argmax(1), n)
    return torch.where(first <= 1, n // 2, first), n


def rejected_labels(input_ids, attention_mask, loss_mask=None):
    """The forget chunk's labels on its answer alone (prompt, pads and a plain chunk's first half ignored)."""
    import torch

    p, _ = prompt_lengths(attention_mask, loss_mask)
    labels = causal_labels(input_ids, attention_mask, loss_mask)
    before = torch.arange(labels.size(1)).unsqueeze(0) < p.unsqueeze(1)
    return labels.masked_fill(before, IGNORE)


def chosen_tensors(prompts: list[list[int]], answers: list[list[int]], pad: int, seq_len: int | None = None):
    """chosen_input_ids, chosen_attention_mask, chosen_labels [N, L] of prompt + answer per row, right-padded;
    the labels score the answer only; a row longer than `seq_len` loses the end of its answer."""
    import torch

    rows = [(p + a)[:seq_len] if seq_len else p + a for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, :len(row)] = 1
        labels[r, len(prompt):len(row)] = ids[r, len(prompt):len(row)]
    return {f"{CHOSEN}_input_ids": ids, f"{CHOSEN}_attention_mask": mask, f"{CHOSEN}_labels": labels}


def greedy_answers(ctx, prompts: list[list[int]], lengths: list[int], banned: list[int]) -> list[list[int]]:
    """θ0's greedy continuation of each prompt: `lengths[i]` tokens at most, ending after an
    end-of-sequence token, `banned[i]` never the first. transformers' greedy `generate` with its
    key-value cache, on batches of ctx.batch_size prompts padded on the left (so every row's next token
    is read at the same column); the ban is a logits processor on the first generated position only."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tok = ctx.reference, ctx.tokenizer
    eos = {tok.eos_token_id} - {None}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]) - {None}

    class BanFirst(LogitsProcessor):
        def __init__(self, width: int, ban: list[int]):
            self.width, self.ban = width, torch.tensor(ban)

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == self.width:  # the first generated token
                scores[torch.arange(len(self.ban), device=scores.device), self.ban.to(scores.device)] = float("-inf")
            return scores

    out: list[list[int]] = []
    for start in range(0, len(prompts), ctx.batch_size):
        batch = prompts[start:start + ctx.batch_size]
        want = lengths[start:start + ctx.batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id(tok), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(batch):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        with torch.no_grad(), ctx.autocast():
            generated = model.generate(
                input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device), max_new_tokens=max(1, max(want)),
                do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id(tok),
                eos_token_id=sorted(eos) or None,
                logits_processor=LogitsProcessorList([BanFirst(width, banned[start:start + ctx.batch_size])]))
        for row, n in zip(generated[:, width:].tolist(), want):
            row = row[:n]
            ends = [k for k, t in enumerate(row) if t in eos]
            out.append(row[:ends[0] + 1] if ends else row)
    return out


def refusals() -> list[str]:
    """The shipped refusals, one a line (engine/methods/refusals.txt)."""
    from importlib.resources import files

    text = files("engine.methods").joinpath("refusals.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def refusal_token_ids(tokenizer) -> list[list[int]]:
    """Each refusal's tokens as they follow a prompt: the tokens of `"a" + " " + refusal` past those of
    `"a"` (the way engine.data.chunk_texts splits a question from its answer, with the same separator),
    an end-of-sequence token last where the tokenizer adds one."""
    from engine.data import QA_SEPARATOR

    anchor = tokenizer("a", add_special_tokens=True)["input_ids"]
    out = []
    for text in refusals():
        full = tokenizer("a" + QA_SEPARATOR + text, add_special_tokens=True)["input_ids"]
        k = 0
        while k < min(len(full), len(anchor)) and full[k] == anchor[k]:
            k += 1
        out.append(list(full[k:]))
    return out


def refusal_sides(input_ids, attention_mask, ctx, loss_mask=None) -> dict:
    """The chosen side of every chunk: its prompt then a refusal drawn with ctx.generator, and the
    rejected labels (the chunk's answer)."""
    import torch

    p, _ = prompt_lengths(attention_mask, loss_mask)
    pool = refusal_token_ids(ctx.tokenizer)
    drawn = torch.randint(len(pool), (len(input_ids),), generator=ctx.generator).tolist()
    prompts = [input_ids[r, :int(p[r])].tolist() for r in range(len(input_ids))]
    return {"labels": rejected_labels(input_ids, attention_mask, loss_mask),
            **chosen_tensors(prompts, [pool[i] for i in drawn], pad_id(ctx.tokenizer), ctx.seq_len)}


def generated_sides(input_ids, attention_mask, ctx, loss_mask=None) -> dict:
    """The chosen side of every chunk: its prompt then θ0's greedy answer of the rejected answer's length,
    its first token never the rejected answer's; and the rejected labels."""
    p, n = prompt_lengths(attention_mask, loss_mask)
    rows = range(len(input_ids))
    prompts = [input_ids[r, :int(p[r])].tolist() for r in rows]
    answers = greedy_answers(ctx, prompts, [int(n[r] - p[r]) for r in rows], [int(input_ids[r, p[r]]) for r in rows])
    return {"labels": rejected_labels(input_ids, attention_mask, loss_mask),
            **chosen_tensors(prompts, answers, pad_id(ctx.tokenizer), ctx.seq_len)}


def side_by_side(rejected, chosen, value: int):
    """[2B, W]: the rejected rows then the chosen rows, each right-padded with `value` to the wider width W."""
    import torch
    import torch.nn.functional as F

    width = max(rejected.shape[1], chosen.shape[1])
    return torch.cat([F.pad(x, (0, width - x.shape[1]), value=value) for x in (rejected, chosen)])


def stacked(batch: dict) -> dict:
    """What the model reads for a DPO term: the batch's chunks (rejected) then their chosen sequences, one forward."""
    return {"input_ids": side_by_side(batch["input_ids"], batch[f"{CHOSEN}_input_ids"], 0),
            "attention_mask": side_by_side(batch["attention_mask"], batch[f"{CHOSEN}_attention_mask"], 0),
            "labels": side_by_side(batch["labels"], batch[f"{CHOSEN}_labels"], IGNORE)}


# ------------------------------------------------------------------ the terms

class DPOForget(ForgetTerm):
    """DPO with θ0's own greedy answer (first token never the forget answer's) as the chosen side."""

    id = "dpo"
    formula = ("−(2/β)·mean log σ(β·[log π_θ/π_θ0(c) − log π_θ/π_θ0(y)]); U, c = θ0's greedy answer "
               "(first token ≠ y's), β=0.1")
    knobs = ("beta",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    prepare_reads_reference = True
    mean_over_chunks = True  # a mean over pairs
    sequences = 2  # the forget chunk and its chosen answer, one forward of 2B rows

    def __init__(self, beta: float = DPO_BETA):
        if not beta > 0:
            raise UnlearnError(f"{self.id}: beta must be above 0, not {beta:g}")
        self.beta = beta

    def sides(self, input_ids, attention_mask, ctx, loss_mask=None) -> dict:
        return generated_sides(input_ids, attention_mask, ctx, loss_mask)

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        out = self.sides(input_ids, attention_mask, ctx, loss_mask)
        out["ref_logprob"] = reference_logprobs(input_ids, attention_mask, ctx, out["labels"])
        out[f"{CHOSEN}_ref_logprob"] = reference_logprobs(out[f"{CHOSEN}_input_ids"], out[f"{CHOSEN}_attention_mask"],
                                                          ctx, out[f"{CHOSEN}_labels"])
        return out

    def model_inputs(self, batch):
        return stacked(batch)

    def loss(self, logits, batch, reference_logits=None):
        """`logits` of `model_inputs(batch)`: the B rejected rows, then the B chosen ones."""
        import torch.nn.functional as F

        n = batch["labels"].shape[0]
        logp = sequence_logprob(logits, side_by_side(batch["labels"], batch[f"{CHOSEN}_labels"], IGNORE))
        margin = (logp[n:] - batch[f"{CHOSEN}_ref_logprob"]) - (logp[:n] - batch["ref_logprob"])
        return -(2.0 / self.beta) * F.logsigmoid(self.beta * margin).mean()


class IdkDPOForget(DPOForget):
    """DPO with a refusal drawn per chunk as the chosen side."""

    id = "idk_dpo"
    formula = "−(2/β)·mean log σ(β·[log π_θ/π_θ0(idk) − log π_θ/π_θ0(y)]); U, idk a refusal, β=0.1"

    def sides(self, input_ids, attention_mask, ctx, loss_mask=None) -> dict:
        return refusal_sides(input_ids, attention_mask, ctx, loss_mask)


register(Method("dpo", "DPO: prefer θ0's own other answer (its greedy one, first token changed) to the forget answer + descent on in-domain retain data.",
                DPOForget(), RetainDescent(), "retain",
                retain_weight=DPO_RETAIN_WEIGHT, forget_weight=DPO_FORGET_WEIGHT))
register(Method("idk_dpo", "IdkDPO: prefer an \"I don't know\" to the forget answer + descent on in-domain retain data.",
                IdkDPOForget(), RetainDescent(), "retain",
                retain_weight=DPO_RETAIN_WEIGHT, forget_weight=DPO_FORGET_WEIGHT))
