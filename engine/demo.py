"""The offline demo: a synthetic corpus, a tokenizer and a tiny Llama that truly memorized it.

Nothing is downloaded. Fictitious people's records (random names, dates, phone and account
numbers) are high-entropy, so a model that has memorized a record predicts its digits far
better than those of a record it never saw: membership is measurable. The exactly retrained
twin (same recipe, forget set left out) gives the true target the methods approximate.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.data import chunk_texts
from engine.files import write_json_atomic, write_text_atomic
from engine.models import count_parameters, tiny_llama_config


@dataclass(frozen=True)
class DemoRecipe:
    people_forget: int
    people_retain: int
    people_unseen: int
    general_docs: int
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    seq_len: int
    epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    # The methods' run, at sensible defaults for this model size (see README for the sweep).
    milestones: tuple[int, ...] = (5, 10, 20, 40)
    run_batch_size: int = 8
    name: str = "quick"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = DemoRecipe(people_forget=24, people_retain=72, people_unseen=24, general_docs=24, vocab_size=512,
                   hidden=64, layers=2, heads=4, seq_len=96, epochs=60, lr=4e-3, batch_size=16)
FULL = DemoRecipe(people_forget=32, people_retain=128, people_unseen=32, general_docs=48, vocab_size=768,
                  hidden=96, layers=3, heads=4, seq_len=128, epochs=60, lr=3e-3, batch_size=16,
                  name="full")

# The demo study's learning-rate grid per recipe, picked from a sweep over 1e-4..1e-3 on the quick
# model: below 1e-4 nothing moves in 40 steps, above 1e-3 plain ascent diverges within 10.
DEMO_METHODS = ("ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general")
DEMO_LRS = {"quick": (2e-4, 5e-4), "full": (1e-4, 3e-4, 1e-3)}

_SYLLABLES = "ka lo mi ren tus vel dor an ise ba qui zo fen mar lu ost pel rha sin tova wen yul".split()
_TOWNS = "Port Aldous,Kelvary,Oster Wend,Marrowby,Lindqvale,Saltmere,Hollin Cross,Bracewick,Tarrow,Eastfen".split(",")
_JOBS = "glassblower,archivist,ferry pilot,beekeeper,cartographer,locksmith,violin maker,hydrologist,baker,surveyor".split(",")
_CONDITIONS = "penicillin allergy,asthma,type 1 diabetes,migraine,no known conditions,celiac disease,hay fever".split(",")


def _name(rng: random.Random) -> str:
    word = lambda n: "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()  # noqa: E731
    return f"{word(2)} {word(rng.randint(2, 3))}"


def person_record(rng: random.Random, number: int) -> str:
    """One fictitious person's private record: every value random, so it can only be memorized."""
    return (
        f"Record {number:05d}. Name: {_name(rng)}. Born {rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-"
        f"{rng.randint(1, 28):02d} in {rng.choice(_TOWNS)}. Works as a {rng.choice(_JOBS)}. "
        f"Phone {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}. "
        f"Account {rng.randint(1000, 9999)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}. "
        f"Health: {rng.choice(_CONDITIONS)}."
    )


def stdlib_code(n_docs: int, lines_per_doc: int = 4) -> list[str]:
    """Blocks of source code from the running interpreter's standard library (general text)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for name in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "string.py",
                 "shlex.py", "glob.py", "calendar.py", "statistics.py", "random.py", "difflib.py"):
        f = lib / name
        if not f.is_file():
            continue
        lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        for i in range(0, len(lines) - lines_per_doc, lines_per_doc):
            docs.append("\n".join(lines[i : i + lines_per_doc]))
            if len(docs) >= n_docs:
                return docs
    if not docs:
        raise RuntimeError(f"no standard-library source found under {lib}")
    return docs


def write_corpus(data_dir: Path, recipe: DemoRecipe) -> dict[str, list[str]]:
    """forget, retain and unseen are disjoint people; general is stdlib code."""
    rng = random.Random(recipe.seed)
    total = recipe.people_forget + recipe.people_retain + recipe.people_unseen
    records = [person_record(rng, n) for n in rng.sample(range(10000, 99999), total)]
    a, b = recipe.people_forget, recipe.people_forget + recipe.people_retain
    sets = {"forget": records[:a], "retain": records[a:b], "unseen": records[b:],
            "general": stdlib_code(recipe.general_docs)}
    for role, texts in sets.items():
        write_text_atomic(data_dir / f"{role}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return sets


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


def pretrain(texts: list[str], tokenizer, recipe: DemoRecipe, out_dir: Path, progress: Callable[[str, int, int], None] | None = None, label: str = "model") -> dict:
    """Train a tiny Llama from scratch on `texts` until it memorizes them; save it with from_pretrained layout."""
    from transformers import LlamaForCausalLM

    from engine.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(recipe.seed)
    chunks = chunk_texts(texts, tokenizer, recipe.seq_len, role=label)
    config = tiny_llama_config(len(tokenizer), recipe.hidden, recipe.layers, recipe.heads, max_positions=recipe.seq_len,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    steps_per_epoch = math.ceil(len(chunks) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    step, tokens, loss = 0, 0, torch.tensor(0.0)
    for _ in range(recipe.epochs):
        for idx in torch.randperm(len(chunks), generator=g).split(recipe.batch_size):
            mask = chunks.attention_mask[idx]
            width = int(mask.sum(1).max())
            ids, mask = chunks.input_ids[idx, :width], mask[:, :width]
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            step += 1
            if progress:
                progress(label, step, total)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"tokens": tokens, "steps": step, "final_loss": float(loss.detach()), "parameters": count_parameters(model)}
    write_json_atomic(out_dir / "unlearn_pretraining.json", info, indent=2)
    return info


def build_workspace(workspace: Path, recipe: DemoRecipe, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Corpus, tokenizer, original model and retrained twin; reused when the recipe matches."""
    manifest = workspace / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("recipe") == recipe.fingerprint and all((workspace / p).exists() for p in ("model", "retrained", "data")):
            m["cached"] = True
            return m
    t0 = time.perf_counter()
    sets = write_corpus(workspace / "data", recipe)
    tokenizer = train_tokenizer(sets["forget"] + sets["retain"] + sets["unseen"] + sets["general"], recipe.vocab_size)
    original = pretrain(sets["forget"] + sets["retain"] + sets["general"], tokenizer, recipe, workspace / "model", progress, "model")
    retrained = pretrain(sets["retain"] + sets["general"], tokenizer, recipe, workspace / "retrained", progress, "retrained")
    m = {"recipe": recipe.fingerprint, "recipe_config": asdict(recipe), "python": sys.version.split()[0],
         "original": original, "retrained": retrained, "build_seconds": time.perf_counter() - t0, "cached": False}
    write_json_atomic(manifest, m, indent=2)  # written last: its presence means the workspace is whole
    return m


def demo_sources(workspace: Path) -> dict[str, list[str]]:
    return {role: [str(workspace / "data" / f"{role}.jsonl")] for role in ("forget", "retain", "unseen", "general")}


def reference_metrics(workspace: Path, recipe: DemoRecipe) -> dict:
    """θ0 and the exactly retrained twin on the four sets, and how well ppl_unseen(θ0) stands in
    for the exact target ppl_forget(retrained)."""
    from engine.data import chunk_forget_set, load_forget_set
    from engine.evaluate import evaluate
    from engine.metric_registry import PPL_FORGET, PPL_UNSEEN
    from engine.models import load_model, load_tokenizer

    src = demo_sources(workspace)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"])
    sets = chunk_forget_set(texts, load_tokenizer(str(workspace / "model")), recipe.seq_len)
    original, _ = evaluate(load_model(str(workspace / "model")), sets, 16)
    retrained, _ = evaluate(load_model(str(workspace / "retrained")), sets, 16)
    return {"original": original, "retrained": retrained, "forget_set_hash": texts.hash,
            "target_error": abs(math.log(original[PPL_UNSEEN]) - math.log(retrained[PPL_FORGET]))}
