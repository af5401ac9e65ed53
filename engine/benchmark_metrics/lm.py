"""The two model calls the benchmark metrics share: the log-probabilities of a text's last tokens
given its beginning, and a greedy continuation of a prompt."""
from __future__ import annotations

import torch


def encode_prefix(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the start of a document: the tokenizer's leading special tokens (BOS
    where it adds one), but no trailing EOS (a prompt, or a prefix of an answer, is not finished)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompt: str, text: str) -> list[float]:
    """log p of each token of `prompt + text` that is not a token of `prompt` alone.

    The tokens scored are those of encode_prefix(prompt + text) past its longest common prefix with
    encode_prefix(prompt): where a token straddles the boundary (a prompt ending in a space before a
    word, with a BPE that merges " word"), it belongs to the continuation."""
    prompt_ids, ids = encode_prefix(tokenizer, prompt), encode_prefix(tokenizer, prompt + text)
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    start = max(start, 1)  # the first token has no prediction
    if start >= len(ids):
        return []
    was_training = model.training
    model.eval()
    x = torch.tensor([ids], device=_device(model))
    logits = model(input_ids=x).logits[0, start - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x[0, start:].unsqueeze(-1)).squeeze(-1)
    if was_training:
        model.train()
    return logp.double().cpu().tolist()


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy (argmax, do_sample=False) continuation of `prompt`, at most
    max_new_tokens tokens, stopping at EOS, decoded without special tokens."""
    ids = torch.tensor([encode_prefix(tokenizer, prompt)], device=_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=True)
