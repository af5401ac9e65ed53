"""Shared fixtures: a real tokenizer, a real tiny Llama that memorized its forget records, and
forget-set files on disk. Nothing is mocked and nothing touches the network.

The model is built and trained here, saved with `save_pretrained` and always loaded back
through `engine.models.load_model`, the path a user's model takes.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

# Tiny models on two cores: OpenMP's second thread only adds synchronization (and, with another
# process busy on the machine, slows a step down by 10-40x). One thread keeps the suite fast, in
# this process and in every process a test starts (a worker pool caps its runs' threads at
# OMP_NUM_THREADS): beside pytest-xdist's other worker, two end-to-end tests took 123 s with a
# pool's two threads per run and 53 s with one.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

SEQ_LEN = 128  # one record is ~110 tokens: one chunk per record
N_FORGET, N_RETAIN, N_UNSEEN, N_GENERAL = 16, 32, 16, 12
TRAIN_STEPS, TRAIN_LR, TRAIN_BATCH = 100, 1e-2, 16


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """~200 fictitious people (disjoint forget/retain/unseen, the rest only for the tokenizer)
    and standard-library code as the general set."""
    return corpus_texts()


def corpus_texts() -> dict[str, list[str]]:
    from engine.demo import person_record, stdlib_code

    rng = random.Random(1234)
    records = [person_record(rng, n) for n in rng.sample(range(10000, 99999), 200)]
    a, b, c = N_FORGET, N_FORGET + N_RETAIN, N_FORGET + N_RETAIN + N_UNSEEN
    sets = {"forget": records[:a], "retain": records[a:b], "unseen": records[b:c],
            "general": stdlib_code(N_GENERAL), "tokenizer_extra": records[c:] + stdlib_code(40)}
    assert len(set(sets["forget"]) | set(sets["retain"]) | set(sets["unseen"])) == c
    return sets


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """A byte-level BPE (vocab 300) trained on the corpus, saved with the tiny model, and loaded
    back like a user's tokenizer."""
    from engine.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(corpus, tmp_path_factory):
    """A 2-layer Llama (hidden 32) trained on forget + retain until it remembers them a bit
    (the unseen records it never saw), saved with model + tokenizer in one folder of the session's.

    Trained once per machine and code: the trained folder is cached on disk (tests/cache.py),
    keyed by everything that shapes its bytes, so pytest-xdist's workers and later sessions copy
    it rather than train it again."""
    from tests.cache import cached_folder, source_key

    key = source_key(corpus_texts, _train_tiny_model, "engine/demo.py", "engine/models.py", "engine/data.py",
                     extra=(SEQ_LEN, N_FORGET, N_RETAIN, N_UNSEEN, N_GENERAL, TRAIN_STEPS, TRAIN_LR, TRAIN_BATCH))
    path = tmp_path_factory.mktemp("tiny_model")
    cached_folder("tiny-model", key, lambda out: _train_tiny_model(corpus, out), path)
    return path


def _train_tiny_model(corpus: dict[str, list[str]], path) -> None:
    """tiny_model_dir's tokenizer and model, made from the corpus into the folder `path`."""
    from transformers import LlamaForCausalLM

    from engine.data import chunk_texts
    from engine.demo import train_tokenizer
    from engine.models import load_tokenizer, tiny_llama_config

    texts = corpus["forget"] + corpus["retain"] + corpus["unseen"] + corpus["tokenizer_extra"]
    tok_dir = path / "tokenizer"
    train_tokenizer(texts, 300).save_pretrained(tok_dir)
    tok = load_tokenizer(str(tok_dir))  # saved and reloaded like a user's tokenizer
    torch.manual_seed(0)
    config = tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, max_positions=SEQ_LEN,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    chunks = chunk_texts(corpus["forget"] + corpus["retain"], tok, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(TRAIN_STEPS):
        idx = torch.randperm(len(chunks), generator=g)[:TRAIN_BATCH]
        ids, mask = chunks.input_ids[idx], chunks.attention_mask[idx]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    shutil.rmtree(tok_dir)


@pytest.fixture(scope="session")
def forget_set_files(corpus, tmp_path_factory) -> dict[str, str]:
    """role -> path of a JSONL file of {"text": ...} rows."""
    d = tmp_path_factory.mktemp("forget_set")
    out = {}
    for role in ("forget", "retain", "unseen", "general"):
        p = d / f"{role}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[role]), encoding="utf-8")
        out[role] = str(p)
    return out


@pytest.fixture(scope="session")
def forget_set_texts(forget_set_files):
    from engine.data import load_forget_set

    f = forget_set_files
    return load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]])


@pytest.fixture(scope="session")
def tiny_sets(forget_set_texts, tiny_tokenizer):
    """The four sets as chunks of SEQ_LEN tokens."""
    from engine.data import chunk_forget_set

    return chunk_forget_set(forget_set_texts, tiny_tokenizer, SEQ_LEN)


@pytest.fixture(scope="module")
def sweeps_store(tmp_path_factory, tiny_model_dir, forget_set_files):
    """tests/app/app_stores.py's store (a finished two-method sweep with a diverged run, a running
    sweep), one per test module: the app's screens and the lab's trial views read it, and a module
    may add studies to its own copy."""
    from tests.app.app_stores import app_store

    return app_store(tmp_path_factory.mktemp("sweeps") / "lab.db", tiny_model_dir, forget_set_files)


@pytest.fixture(autouse=True)
def restore_determinism():
    """A run turns torch's deterministic algorithms on (fp32 and deterministic on CPU:
    docs/concepts.md, Runs): keep that global switch from leaking out of the test that ran it."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh copy of the tiny model, loaded the user's way (tests may train it)."""
    from engine.models import load_model

    return load_model(str(tiny_model_dir), "cpu").eval()


@pytest.fixture(scope="session", autouse=True)
def isolated_unlearn_home(tmp_path_factory):
    """Caches and logs of the code under test go to a temp folder, never the user's ~/.cache;
    subprocesses inherit it through the environment."""
    home = tmp_path_factory.mktemp("unlearn_home")
    old = os.environ.get("UNLEARN_HOME")
    os.environ["UNLEARN_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("UNLEARN_HOME", None)
    else:
        os.environ["UNLEARN_HOME"] = old


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`unlearn demo --quick` run once per session, in a subprocess as a user runs it: the
    workspace, its JSON report and the wall time. The demo's own test checks it; the app's
    end-to-end tests work on its store (they add studies, never change the demo's).

    Its workspace's build (corpus, tokenizer, a base model pre-trained from scratch, θ0 and the
    retrained twin: ~70 s of CPU, a third of the demo) is made once per machine and code, by the
    demo's own build_workspace in a subprocess with the demo's threads, and cached (tests/cache.py);
    the demo finds it built and runs its study and controls, as a second `unlearn demo` would.
    The build itself runs here whenever the code that shapes it changes. The demo runs with the
    suite's one thread per process (OMP_NUM_THREADS=1, above): beside pytest-xdist's other worker,
    its evaluations' second thread would only spin."""
    import subprocess
    import sys
    import time

    from tests.cache import cached_folder, source_key

    ws = tmp_path_factory.mktemp("quick_demo") / "W"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def build(out) -> None:
        code = "import sys; from pathlib import Path; from engine.demo import QUICK, build_workspace; " \
               "build_workspace(Path(sys.argv[1]), QUICK)"
        b = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=900)
        assert b.returncode == 0, b.stderr[-3000:]

    key = source_key("engine/demo.py", "engine/demo_corpus.py", "engine/data.py", "engine/models.py", "engine/files.py",
                     extra=(os.cpu_count(),))  # the build's threads: the machine's (env above drops OMP_NUM_THREADS)
    cached_folder("quick-demo-workspace", key, build, ws)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--quick", "--workspace", str(ws), "--json"],
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    return ws, json.loads(p.stdout), wall


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (.ci/run: -n auto --dist loadgroup), every test on the quick demo's
    workspace runs in one worker: the demo is built once per session, and each worker is a session
    of its own."""
    for item in items:
        if "quick_demo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("quick_demo"))
    heaviest_first(items)


def heaviest_first(items) -> None:
    """Order the modules (each kept whole, its tests in their order) so the heavy ones start first:
    the quick demo's, then by their number of slow tests. pytest-xdist hands tests out in this order;
    long tests left for the end would keep one worker busy while the other idles (longest first
    balances two workers best)."""
    weight: dict[str, tuple] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        demo, slow = weight.get(module, (0, 0))
        weight[module] = (demo or int("quick_demo" in getattr(item, "fixturenames", ())),
                          slow + int(item.get_closest_marker("slow") is not None))
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(it.nodeid.split("::", 1)[0] for it in items))}
    items.sort(key=lambda it: (-weight[m := it.nodeid.split("::", 1)[0]][0], -weight[m][1], first_seen[m]))


@pytest.fixture
def pg_database():
    """The URL of a PostgreSQL database of the test's own on the CI's server (dropped after), and an
    admin connection to that server (autocommit); skipped where UNLEARN_TEST_PG_URL is not set."""
    import os
    import uuid

    import psycopg2

    base = os.environ.get("UNLEARN_TEST_PG_URL")
    if not base:
        pytest.skip("UNLEARN_TEST_PG_URL is not set (.ci/postgres sets it where PostgreSQL can run)")
    def connect():
        con = psycopg2.connect(base.replace("postgresql+psycopg2://", "postgresql://"))
        con.autocommit = True
        return con

    name = f"ul_t_{uuid.uuid4().hex[:10]}"
    admin = connect()
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name, admin
    finally:
        admin.close()
        admin = connect()  # a fresh one: the test may have restarted the server
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
