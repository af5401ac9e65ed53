"""The offline demo: a tiny Llama pre-trained on a broad synthetic corpus, then fine-tuned on the
people it will be asked to forget — a pre-trained LLM's regime, at CPU scale (TOFU's design).

Nothing is downloaded. The base model is pre-trained on many *other* fictitious people's
question–answer pairs (engine/demo_corpus.py: answers partly follow rules, partly are secrets)
and on standard-library code, so it generalizes: it knows the rules and the priors of the
secrets. θ0 is that base fine-tuned a few epochs (loss on the answers) on the forget, retain and
retain_eval people: it memorizes their secrets only partly, so a forget answer is a little more
likely than an unseen person's — a measurable but not rote membership signal. The retrained twin
(the positive control) is the same base fine-tuned the same way on everything but forget.

Roles (`W/data/<role>.jsonl`, rows {"question", "answer"}): forget, retain (the retain terms train
on it), retain_eval (fine-tuned on, held out of every retain term: utility), unseen (never trained
on: the approximate-retraining reference and the MIA non-members), general (held-out stdlib code,
an empty question: plain text).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.data import chunk_texts
from engine.demo_corpus import GENERAL_FILES, PRETRAIN_FILES, code_blocks, make_people
from engine.files import write_json_atomic, write_text_atomic
from engine.models import count_parameters, tiny_llama_config

ROLES = ("forget", "retain", "retain_eval", "unseen", "general")
QA_FIELDS = {"prompt_field": "question", "answer_field": "answer"}
FINETUNED_ROLES = ("forget", "retain", "retain_eval")  # θ0's fine-tuning set; the twin's is all but forget


@dataclass(frozen=True)
class DemoRecipe:
    # people per role (each person is seven question–answer documents, engine.demo_corpus.Person.qa)
    people_forget: int
    people_retain: int
    people_retain_eval: int
    people_unseen: int
    general_docs: int  # held-out stdlib code blocks
    # the base model's pre-training corpus: other people's pairs (as text) and other stdlib code
    pretrain_people: int
    pretrain_code_docs: int
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    seq_len: int
    pretrain_steps: int
    pretrain_lr: float
    pretrain_batch: int
    finetune_epochs: int
    finetune_lr: float
    finetune_batch: int
    seed: int = 0
    # The methods' run, at sensible defaults for this model size.
    milestones: tuple[int, ...] = (5, 10, 20, 40)
    run_batch_size: int = 8
    name: str = "quick"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = DemoRecipe(people_forget=12, people_retain=36, people_retain_eval=12, people_unseen=12, general_docs=24,
                   pretrain_people=1000, pretrain_code_docs=300, vocab_size=512, hidden=64, layers=2, heads=4,
                   seq_len=96, pretrain_steps=1600, pretrain_lr=4e-3, pretrain_batch=16,
                   finetune_epochs=5, finetune_lr=2e-3, finetune_batch=16)
FULL = DemoRecipe(people_forget=20, people_retain=80, people_retain_eval=20, people_unseen=20, general_docs=48,
                  pretrain_people=3000, pretrain_code_docs=800, vocab_size=768, hidden=96, layers=3, heads=4,
                  seq_len=96, pretrain_steps=3000, pretrain_lr=3e-3, pretrain_batch=16,
                  finetune_epochs=12, finetune_lr=4e-3, finetune_batch=16, name="full")

DEMO_METHODS = ("ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general")
# The demo study's learning-rate grid per recipe, fixed from each recipe's fine-tuning lr alone (peak
# 2e-3 QUICK, 4e-3 FULL; cosine to 0, so about half that on average) before any method ran on these
# workspaces: undoing a fine-tuning takes steps of the size that made it, so each grid holds the
# fine-tuning peak and a quarter of it (FULL also the half; QUICK, 2 workers × 14 runs within its time
# budget, keeps the two ends).
DEMO_LRS = {"quick": (5e-4, 2e-3), "full": (1e-3, 2e-3, 4e-3)}


def person_record(rng: random.Random, number: int) -> str:
    """One fictitious person's private record as plain text, every value random (tests and benches
    use it for a plain-text forget set; the demo itself uses engine.demo_corpus's people)."""
    from engine.demo_corpus import CONDITIONS, JOBS, SYLLABLES, TOWNS

    word = lambda n: "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()  # noqa: E731
    towns, jobs = list(TOWNS)[:10], list(JOBS)[:10]
    return (
        f"Record {number:05d}. Name: {word(2)} {word(rng.randint(2, 3))}. Born {rng.randint(1940, 2005)}-"
        f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} in {rng.choice(towns)}. Works as a {rng.choice(jobs)}. "
        f"Phone {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}. "
        f"Account {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}. "
        f"Health: {rng.choice(CONDITIONS[:7])}."
    )


def stdlib_code(n_docs: int, lines_per_doc: int = 4) -> list[str]:
    """Blocks of source code from the running interpreter's standard library (general text)."""
    return code_blocks(GENERAL_FILES, n_docs, lines_per_doc)


def make_corpus(recipe: DemoRecipe) -> dict:
    """{"roles": {role: [(question, answer)]}, "pretrain": [text]}: disjoint people per role, and the
    pre-training corpus of other people (their pairs as plain text, "question answer") and other code.
    general's candidates are two-line code blocks, twice as many as kept (fit_general keeps them)."""
    rng = random.Random(recipe.seed)
    taken: set[str] = set()
    counts = {"forget": recipe.people_forget, "retain": recipe.people_retain,
              "retain_eval": recipe.people_retain_eval, "unseen": recipe.people_unseen}
    roles = {role: [pair for p in make_people(rng, n, taken) for pair in p.qa()] for role, n in counts.items()}
    roles["general"] = [("", code) for code in code_blocks(GENERAL_FILES, 2 * recipe.general_docs, 2)]
    others = [f"{q} {a}" for p in make_people(rng, recipe.pretrain_people, taken) for q, a in p.qa()]
    pretrain = others + code_blocks(PRETRAIN_FILES, recipe.pretrain_code_docs, 6)
    random.Random(recipe.seed + 1).shuffle(pretrain)
    return {"roles": roles, "pretrain": pretrain}


def fit_general(pairs: list[tuple[str, str]], tokenizer, recipe: DemoRecipe) -> list[tuple[str, str]]:
    """The first general_docs code blocks that fit one chunk: a general row has an empty question,
    and a document of one chunk scores the same whether it is read as plain text or as an answer."""
    fits = [p for p in pairs if len(tokenizer(p[1])["input_ids"]) <= recipe.seq_len]
    return fits[:recipe.general_docs]


def write_corpus(data_dir: Path, roles: dict[str, list[tuple[str, str]]]) -> None:
    for role, pairs in roles.items():
        write_text_atomic(data_dir / f"{role}.jsonl",
                          "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))


def read_role(workspace: Path, role: str) -> list[tuple[str, str]]:
    path = workspace / "data" / f"{role}.jsonl"
    return [(r["question"], r["answer"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r]


def qa_chunks(pairs: list[tuple[str, str]], tokenizer, seq_len: int, role: str):
    """Question–answer chunks (the question is context, the answer scored); an empty question: plain text."""
    return chunk_texts([a for _, a in pairs], tokenizer, seq_len, role=role, prompts=[q or None for q, _ in pairs])


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (the GPT-2/Llama-3 family's kind), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def new_model(tokenizer, recipe: DemoRecipe):
    from transformers import LlamaForCausalLM

    from engine.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), recipe.hidden, recipe.layers, recipe.heads,
                                              max_positions=recipe.seq_len, bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def train_steps(model, chunks, steps: int, lr: float, batch_size: int, seed: int,
                progress: Callable[[str, int, int], None] | None = None, label: str = "model") -> dict:
    """`steps` AdamW steps (linear warm-up over the first 10%, cosine decay to 0) on the chunks' scored
    tokens (a QA chunk's answer only), in seeded epochs of shuffled batches. Returns what it cost."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    lengths = chunks.attention_mask.sum(1)
    model.train()
    step, tokens, loss = 0, 0, torch.tensor(0.0)
    while step < steps:
        for idx in _length_grouped_batches(lengths, batch_size, g):
            if step == steps:
                break
            mask = chunks.attention_mask[idx]
            width = int(mask.sum(1).max())
            ids, mask, scored = chunks.input_ids[idx, :width], mask[:, :width], chunks.loss_mask[idx, :width]
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(scored == 0, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            step += 1
            if progress:
                progress(label, step, steps)
    return {"tokens": tokens, "steps": step, "final_loss": float(loss.detach()), "parameters": count_parameters(model)}


def _length_grouped_batches(lengths: torch.Tensor, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches: a seeded shuffle, sorted by length within windows of 16 batches (so a
    batch's rows are of about one length and little of it is padding), in shuffled order."""
    perm = torch.randperm(len(lengths), generator=g)
    batches = []
    for window in perm.split(batch_size * 16):
        batches += list(window[torch.argsort(lengths[window], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def save(model, tokenizer, out_dir: Path, info: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_json_atomic(out_dir / "unlearn_pretraining.json", info, indent=2)
    return info


def pretrain(texts: list[str], tokenizer, recipe: DemoRecipe, out_dir: Path,
             progress: Callable[[str, int, int], None] | None = None, label: str = "base") -> dict:
    """The base model: a tiny Llama trained from scratch on the pre-training corpus (plain text)."""
    model = new_model(tokenizer, recipe)
    chunks = chunk_texts(texts, tokenizer, recipe.seq_len, role=label)
    info = train_steps(model, chunks, recipe.pretrain_steps, recipe.pretrain_lr, recipe.pretrain_batch,
                       recipe.seed, progress, label)
    return save(model, tokenizer, out_dir, info)


def finetune(base_dir: Path, pairs: list[tuple[str, str]], tokenizer, recipe: DemoRecipe, out_dir: Path,
             progress: Callable[[str, int, int], None] | None = None, label: str = "model", seed: int | None = None) -> dict:
    """The base fine-tuned `finetune_epochs` epochs on question–answer pairs (loss on the answers).
    What it records as its training tokens is the base's pre-training plus this fine-tuning."""
    from engine.models import load_model

    model = load_model(str(base_dir))
    chunks = qa_chunks(pairs, tokenizer, recipe.seq_len, label)
    steps = math.ceil(len(chunks) / recipe.finetune_batch) * recipe.finetune_epochs
    seed = recipe.seed if seed is None else seed
    info = train_steps(model, chunks, steps, recipe.finetune_lr, recipe.finetune_batch, seed, progress, label)
    base = json.loads((base_dir / "unlearn_pretraining.json").read_text())
    info = {**info, "finetune_tokens": info["tokens"], "tokens": base["tokens"] + info["tokens"]}
    return save(model, tokenizer, out_dir, info)


def build_workspace(workspace: Path, recipe: DemoRecipe, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Corpus, tokenizer, base model, original model θ0 and retrained twin; reused when the recipe matches."""
    manifest = workspace / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("recipe") == recipe.fingerprint and all((workspace / p).exists()
                                                         for p in ("base", "model", "retrained", "data")):
            m["cached"] = True
            return m
    t0 = time.perf_counter()
    corpus = make_corpus(recipe)
    roles = corpus["roles"]
    tokenizer = train_tokenizer(corpus["pretrain"] + [f"{q} {a}".strip() for pairs in roles.values() for q, a in pairs],
                                recipe.vocab_size)
    roles["general"] = fit_general(roles["general"], tokenizer, recipe)
    write_corpus(workspace / "data", roles)
    timings = {"corpus_tokenizer": time.perf_counter() - t0}
    base = pretrain(corpus["pretrain"], tokenizer, recipe, workspace / "base", progress, "base")
    timings["base"] = time.perf_counter() - t0 - sum(timings.values())
    original = finetune(workspace / "base", [p for r in FINETUNED_ROLES for p in roles[r]], tokenizer, recipe,
                        workspace / "model", progress, "model")
    timings["model"] = time.perf_counter() - t0 - sum(timings.values())
    retrained = finetune(workspace / "base", [p for r in FINETUNED_ROLES if r != "forget" for p in roles[r]],
                         tokenizer, recipe, workspace / "retrained", progress, "retrained")
    timings["retrained"] = time.perf_counter() - t0 - sum(timings.values())
    m = {"recipe": recipe.fingerprint, "recipe_config": asdict(recipe), "python": sys.version.split()[0],
         "qa": dict(QA_FIELDS), "roles": {r: len(roles[r]) for r in ROLES},
         "base": base, "original": original, "retrained": retrained, "timings": timings,
         "build_seconds": time.perf_counter() - t0, "cached": False}
    write_json_atomic(manifest, m, indent=2)  # written last: its presence means the workspace is whole
    return m


def demo_sources(workspace: Path) -> dict[str, list[str]]:
    return {role: [str(workspace / "data" / f"{role}.jsonl")] for role in ROLES}


def demo_texts(workspace: Path, manifest: dict):
    """The workspace's forget set: its five roles, question–answer rows where the manifest says so."""
    from engine.data import load_forget_set

    src = demo_sources(workspace)
    qa = manifest.get("qa") or {}
    return load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"], retain_eval=src["retain_eval"],
                           prompt_field=qa.get("prompt_field"), answer_field=qa.get("answer_field"))


def demo_controls(workspace: Path, recipe: DemoRecipe, manifest: dict) -> dict:
    """θ0's regime, the target and its band, and both controls (engine.controls), on the demo's set."""
    from engine.controls import controls
    from engine.data import chunk_forget_set
    from engine.models import load_tokenizer

    texts = demo_texts(workspace, manifest)
    sets = chunk_forget_set(texts, load_tokenizer(str(workspace / "model")), recipe.seq_len)
    return {**controls(workspace / "model", workspace / "retrained", sets), "forget_set_hash": texts.hash}
