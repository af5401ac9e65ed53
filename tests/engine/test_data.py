"""engine.data: sources -> documents -> forget set hash -> chunks.

Real files, a real (tiny, locally trained) tokenizer and real `datasets` loading of local
folders; nothing is mocked and nothing touches the network.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pandas as pd
import pytest
import torch

from engine.data import (
    MIN_CHUNK_TOKENS,
    ROLES,
    Chunks,
    ForgetSetTexts,
    chunk_forget_set,
    chunk_texts,
    load_forget_set,
    load_texts,
    normalize_text,
)
from engine.errors import DataError, UnlearnError

# A digit is never merged by the tokenizer below (its corpus has none), so "7" * n is n tokens.
DIGIT = "7"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """Byte-level BPE trained here, saved and reloaded through AutoTokenizer like a user's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "alice lives in paris",
              "def forget(self): return None"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache inside the test's tmp folder, not the user's HF_HOME."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write(path, content, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- file formats

def test_text_and_code_files_are_one_document_each(tmp_path):
    body = "line one\nline two\n"
    for name in ("a.txt", "b.md", "c.py", "d.rs", "e.rst"):
        assert load_texts(str(write(tmp_path / name, body))) == [body]


def test_text_file_with_invalid_utf8_is_replaced_not_fatal(tmp_path):
    p = write(tmp_path / "bad.txt", b"caf\xe9 ok", mode="wb")
    assert load_texts(str(p)) == ["caf\ufffd ok"]


def test_utf8_bom_is_not_part_of_the_text(tmp_path):
    assert load_texts(str(write(tmp_path / "b.txt", "\ufeffhi"))) == ["hi"]
    assert load_texts(str(write(tmp_path / "b.jsonl", '\ufeff{"text": "hi"}\n'))) == ["hi"]
    assert load_texts(str(write(tmp_path / "b.json", '\ufeff["hi"]'))) == ["hi"]
    assert load_texts(str(write(tmp_path / "b.csv", "\ufefftext\nhi\n"))) == ["hi"]  # Excel-style


def test_jsonl_one_document_per_line(tmp_path):
    p = jsonl(tmp_path / "f.jsonl", [{"text": "one", "id": 1}, {"text": "  "}, {"text": "two"}])
    write(p, p.read_text() + "\n\n")  # trailing blank lines are fine
    assert load_texts(str(p)) == ["one", "two"]  # the blank document is dropped
    q = jsonl(tmp_path / "g.jsonl", [{"body": "x"}, {"body": "y"}])
    assert load_texts(str(q), text_field="body") == ["x", "y"]


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json", "forget.jsonl:3: not JSON"),
    ('["a list"]', "forget.jsonl:3: expected a JSON object"),
    ('{"content": "x"}', "forget.jsonl:3: no field 'text'"),
    ('{"text": 5}', "forget.jsonl:3: field 'text' is int"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, expected):
    p = write(tmp_path / "forget.jsonl", '{"text": "a"}\n\n' + bad_line + "\n")
    with pytest.raises(DataError, match=expected):
        load_texts(str(p))


def test_json_shapes(tmp_path):
    rows = [{"text": "r1"}, {"text": "r2"}]
    assert load_texts(str(write(tmp_path / "a.json", json.dumps(rows)))) == ["r1", "r2"]
    assert load_texts(str(write(tmp_path / "b.json", json.dumps(["s1", "s2"])))) == ["s1", "s2"]
    for key in ("data", "rows", "train"):
        p = write(tmp_path / f"{key}.json", json.dumps({"meta": 1, key: rows}))
        assert load_texts(str(p)) == ["r1", "r2"]


def test_json_errors(tmp_path):
    p = write(tmp_path / "m.json", json.dumps([{"text": "a"}, {"other": "b"}]))
    with pytest.raises(DataError, match=r"m\.json: row 1: no field 'text'"):
        load_texts(str(p))
    with pytest.raises(DataError, match="data, rows, train"):
        load_texts(str(write(tmp_path / "o.json", json.dumps({"items": []}))))
    with pytest.raises(DataError, match=r"x\.json:2: not JSON"):
        load_texts(str(write(tmp_path / "x.json", "[\n oops]")))


def test_csv_column_and_text_kept_verbatim(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"text": ["hello", "NA", "1984", ""], "body": ["b1", "b2", "b3", "b4"]}).to_csv(p, index=False)
    assert load_texts(str(p)) == ["hello", "NA", "1984"]  # "NA" and numbers stay text; "" dropped
    assert load_texts(str(p), column="body") == ["b1", "b2", "b3", "b4"]
    assert load_texts(str(p), text_field="body") == ["b1", "b2", "b3", "b4"]


def test_csv_unknown_column_lists_columns(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"title": ["a"], "body": ["b"]}).to_csv(p, index=False)
    with pytest.raises(DataError, match=r"no column 'text'; columns: title, body"):
        load_texts(str(p))


def test_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["p1", None, "p2"], "n": [1, 2, 3]}).to_parquet(p)
    assert load_texts(str(p)) == ["p1", "p2"]
    with pytest.raises(DataError, match=r"no column 'body'; columns: text, n"):
        load_texts(str(p), column="body")
    with pytest.raises(DataError, match="field 'n' is int"):
        load_texts(str(p), column="n")


# ---------------------------------------------------------------- folders, globs, errors

def test_folder_is_recursive_sorted_and_skips_hidden_and_unsupported(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "B")
    write(root / "a" / "z.md", "AZ")
    write(root / "a" / "rows.jsonl", '{"text": "J1"}\n{"text": "J2"}\n')
    write(root / "c" / "d" / "e.py", "E")
    write(root / ".hidden.txt", "HIDDEN")
    write(root / ".git" / "x.txt", "GIT")
    write(root / "image.png", "PNG")
    assert load_texts(str(root)) == ["J1", "J2", "AZ", "B", "E"]


def test_glob_sorted_and_recursive(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a.txt", "A")
    write(tmp_path / "c.md", "C")
    write(tmp_path / "sub" / "d.txt", "D")
    assert load_texts(str(tmp_path / "*.txt")) == ["A", "B"]
    assert load_texts(str(tmp_path / "[ab].*")) == ["A", "B"]
    assert load_texts(str(tmp_path / "**" / "*.txt")) == ["A", "B", "D"]
    with pytest.raises(DataError, match="no file matches"):
        load_texts(str(tmp_path / "*.csv"))


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError) as e:
        load_texts(missing)
    assert str(e.value) == f"no such file or folder: {missing}"
    assert isinstance(e.value, UnlearnError)


def test_unsupported_explicit_file_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.png'"):
        load_texts(str(write(tmp_path / "x.png", "x")))
    empty = write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(DataError, match="empty.txt yields no documents"):
        load_texts(str(empty))
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="void yields no documents"):
        load_texts(str(tmp_path / "void"))


# ---------------------------------------------------------------- hf: sources (local only)

def test_hf_local_folder_of_jsonl_files(tmp_path):
    folder = tmp_path / "my" / "dataset"  # NAME holds '/': SPLIT is after the last one
    jsonl(folder / "train.jsonl", [{"text": "t1", "alt": "a1"}, {"text": "t2", "alt": "a2"}])
    jsonl(folder / "test.jsonl", [{"text": "x1", "alt": "b1"}])
    assert load_texts(f"hf:{folder}/train") == ["t1", "t2"]
    assert load_texts(f"hf:{folder}/test#alt") == ["b1"]
    assert load_texts(f"hf:{folder}/train", column="alt") == ["a1", "a2"]
    with pytest.raises(DataError, match=r"no column 'body'; columns: text, alt"):
        load_texts(f"hf:{folder}/train#body")
    with pytest.raises(DataError, match="cannot load"):
        load_texts(f"hf:{folder}/validation")  # no such split: wrapped in one line
    with pytest.raises(DataError, match=r"expected hf:NAME\[:CONFIG\]/SPLIT"):
        load_texts("hf:just-a-name")


def test_hf_save_to_disk_dataset_dict_and_dataset(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "forget": datasets.Dataset.from_dict({"content": ["f1", "f2"], "text": ["x", "y"]}),
        "holdout": datasets.Dataset.from_dict({"content": ["h1"], "text": ["z"]}),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_texts(f"hf:{tmp_path / 'saved'}/holdout#content") == ["h1"]
    assert load_texts(f"hf:{tmp_path / 'saved'}/forget") == ["x", "y"]
    with pytest.raises(DataError, match="no split 'train'; splits: forget, holdout"):
        load_texts(f"hf:{tmp_path / 'saved'}/train")
    dd["forget"].save_to_disk(str(tmp_path / "single"))
    assert load_texts(f"hf:{tmp_path / 'single'}/train#content") == ["f1", "f2"]


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    # no HF_HUB_OFFLINE, and the Hub's endpoint does not answer (a closed local port stands in for no network)
    ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:1"}, "no network: 127.0.0.1 cannot be reached"),
])
def test_hf_dataset_offline_is_one_line_and_quick(tmp_path, env, reason):
    """Without a network a hub dataset that is not cached is one line, at once, and nothing else on
    stderr (huggingface_hub would otherwise retry for half a minute, warning each time)."""
    import subprocess
    import sys
    import time

    code = ("from engine.data import load_texts\n"
            "try:\n    load_texts('hf:nobody-here/no-such-dataset/train')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "HTTPS", "ALL_PROXY"))}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"DataError hf:nobody-here/no-such-dataset/train: not in the local Hugging Face cache "
                                f"({reason})")
    assert p.stderr.strip() == ""
    assert took < 20, f"{took:.1f} s"


# ---------------------------------------------------------------- forget set and hash

def test_normalize_text():
    assert normalize_text("e\u0301\r\nb\rc  \n\t") == "\u00e9\nb\nc"
    assert normalize_text("  lead kept") == "  lead kept"


def _fs(forget=("a", "b"), retain=("r",), unseen=("u",), general=()):
    return ForgetSetTexts(list(forget), list(retain), list(unseen), list(general), sources={})


def test_hash_stable_order_dependent_and_content_sensitive():
    h = _fs().hash
    assert len(h) == 64 and h == _fs().hash
    assert _fs(forget=("b", "a")).hash != h  # order matters
    assert _fs(forget=("a", "c")).hash != h  # content matters
    assert _fs(forget=("ab",)).hash != _fs(forget=("a", "b")).hash  # boundaries matter
    assert _fs(forget=("a",), retain=("b", "r")).hash != h  # roles matter
    assert _fs(general=("g",)).hash != h
    assert _fs(forget=("a\r\nx", "b")).hash == _fs(forget=("a\nx", "b")).hash
    assert _fs(forget=("e\u0301", "b  \n")).hash == _fs(forget=("\u00e9", "b")).hash


def test_load_forget_set(tmp_path):
    f = write(tmp_path / "forget.txt", "secret one\r\n")
    r = jsonl(tmp_path / "retain.jsonl", [{"text": "keep 1"}, {"text": "keep 2"}])
    u = write(tmp_path / "unseen.md", "never seen")
    fs = load_forget_set([str(f)], [str(r)], [str(u)])
    assert fs.forget == ["secret one"]  # stored normalized: chunked text == hashed text
    # no retain_eval source: a seeded share of retain is held out (at least one document, one kept)
    assert fs.counts() == {"forget": 1, "retain": 1, "retain_eval": 1, "unseen": 1, "general": 0}
    assert sorted(fs.retain + fs.retain_eval) == ["keep 1", "keep 2"]
    assert fs.sources == {"forget": [str(f)], "retain": [str(r)], "retain_eval": [], "unseen": [str(u)], "general": []}
    again = load_forget_set([str(f)], [str(r)], [str(u)])
    assert again.hash == fs.hash
    write(tmp_path / "forget.txt", "secret one\n")  # same text, other line endings
    assert load_forget_set([str(f)], [str(r)], [str(u)]).hash == fs.hash
    g = load_forget_set([str(f)], [str(r)], [str(u)], general=[str(u)])
    assert g.counts()["general"] == 1 and g.hash != fs.hash
    given = load_forget_set([str(f)], [str(r)], [str(u)], retain_eval=[str(u)])
    assert given.retain == ["keep 1", "keep 2"] and given.retain_eval == ["never seen"] and given.hash != fs.hash


def test_retain_eval_is_a_seeded_share_of_retain_and_part_of_the_hash(tmp_path):
    from engine.data import hold_out_retain_eval

    f = write(tmp_path / "forget.txt", "secret")
    r = jsonl(tmp_path / "retain.jsonl", [{"text": f"keep {i}"} for i in range(20)])
    u = write(tmp_path / "unseen.md", "never seen")
    fs = load_forget_set([str(f)], [str(r)], [str(u)])
    assert len(fs.retain_eval) == 4 and len(fs.retain) == 16  # the default share, 0.2
    assert not set(fs.retain) & set(fs.retain_eval)
    assert fs.retain == sorted(fs.retain, key=lambda t: int(t.split()[1]))  # document order kept in both
    assert load_forget_set([str(f)], [str(r)], [str(u)]).retain_eval == fs.retain_eval  # seeded
    other = load_forget_set([str(f)], [str(r)], [str(u)], split_seed=1)
    assert other.retain_eval != fs.retain_eval and other.hash != fs.hash  # the split is part of the hash
    assert len(load_forget_set([str(f)], [str(r)], [str(u)], retain_eval_share=0.5).retain_eval) == 10
    # a set made before retain_eval existed (none held out) keeps the hash it always had
    whole = replace(fs, retain=[f"keep {i}" for i in range(20)], retain_eval=[])
    assert whole.hash == ForgetSetTexts(forget=fs.forget, retain=whole.retain, unseen=fs.unseen, general=[],
                                        sources={}).hash
    with pytest.raises(DataError, match="at least 2"):
        hold_out_retain_eval(replace(fs, retain=["one"], retain_eval=[]))
    with pytest.raises(DataError, match=r"share must be in \(0, 1\)"):
        load_forget_set([str(f)], [str(r)], [str(u)], retain_eval_share=1.0)


def test_load_forget_set_errors_name_the_role(tmp_path):
    ok = str(write(tmp_path / "ok.txt", "text"))
    with pytest.raises(DataError, match="the unseen set is empty"):
        load_forget_set([ok], [ok], [])
    with pytest.raises(DataError, match="the forget set is empty"):
        load_forget_set([], [ok], [ok])
    with pytest.raises(DataError, match="^retain: no such file or folder"):
        load_forget_set([ok], [str(tmp_path / "gone")], [ok])


# ---------------------------------------------------------------- chunking

def test_tokenizer_fixture_counts_digits_one_each(tokenizer):
    ids = tokenizer(DIGIT * 40, add_special_tokens=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 41


def test_chunk_windows_padding_and_dropping(tokenizer):
    # doc 0: 1 BOS + 79 tokens = 80 -> windows 32, 32, 16 (kept: exactly the minimum)
    # doc 1: 1 + 9 = 10 tokens -> one window under 16: dropped
    # doc 2: 1 + 49 = 50 -> 32, 18
    # doc 3: 1 + 40 = 41 -> 32, 9 (the 9-token tail is dropped)
    docs = [DIGIT * 79, DIGIT * 9, DIGIT * 49, DIGIT * 40]
    c = chunk_texts(docs, tokenizer, seq_len=32)
    lengths = c.attention_mask.sum(1).tolist()
    assert lengths == [32, 32, 16, 32, 18, 32]
    assert c.doc_index == [0, 0, 0, 2, 2, 3]
    assert len(c) == 6 and c.input_ids.shape == (6, 32) and c.input_ids.dtype == torch.long
    assert c.n_tokens == sum(lengths)
    assert c.input_ids[0, 0] == tokenizer.bos_token_id  # BOS only where a document starts
    assert c.input_ids[1, 0] != tokenizer.bos_token_id
    # right padding with the pad id, and only there is the mask 0
    pad = tokenizer.pad_token_id
    assert (c.input_ids[2, 16:] == pad).all() and (c.attention_mask[2, 16:] == 0).all()
    assert (c.attention_mask[2, :16] == 1).all() and not (c.input_ids[2, :16] == pad).any()
    assert c.texts[0] == DIGIT * 31 and c.texts[1] == DIGIT * 32  # specials skipped


def test_chunk_common_length_is_longest_window(tokenizer):
    c = chunk_texts([DIGIT * 19, DIGIT * 24], tokenizer, seq_len=512)
    assert c.input_ids.shape == (2, 25)
    assert c.attention_mask.sum(1).tolist() == [20, 25]


def test_chunk_real_text_roundtrip(tokenizer):
    text = "the quick brown fox jumps over the lazy dog, and alice lives in paris. " * 20
    ids = tokenizer(text)["input_ids"]
    c = chunk_texts([text], tokenizer, seq_len=64)
    kept = len(ids) // 64 * 64 + (len(ids) % 64 if len(ids) % 64 >= MIN_CHUNK_TOKENS else 0)
    assert c.n_tokens == kept and c.attention_mask.sum(1).max() == 64
    joined = "".join(c.texts)  # windows cut between tokens, never inside one: the text reassembles
    assert text.startswith(joined) and len(joined) > len(text) - 64 * 8


def test_chunk_errors(tokenizer):
    with pytest.raises(DataError, match=r"^the forget set is empty after chunking \(every window "
                                        r"is under 16 tokens at seq_len=32\)$"):
        chunk_texts([DIGIT * 5, DIGIT * 14], tokenizer, seq_len=32, role="forget")
    with pytest.raises(DataError, match="seq_len=8"):
        chunk_texts([DIGIT * 100], tokenizer, seq_len=MIN_CHUNK_TOKENS // 2)


def test_pad_falls_back_to_eos(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    c = chunk_texts([DIGIT * 19, DIGIT * 24], tok, seq_len=64)
    assert (c.input_ids[0, 20:] == tokenizer.eos_token_id).all()


def test_subset_keeps_length(tokenizer):
    c = chunk_texts([DIGIT * 19, DIGIT * 24, DIGIT * 30], tokenizer, seq_len=64)
    s = c.subset([2, 0])
    assert s.input_ids.shape == (2, 31) and s.doc_index == [2, 0]
    assert s.texts == [c.texts[2], c.texts[0]]
    assert torch.equal(s.attention_mask[1], c.attention_mask[0])
    t = c.subset(torch.tensor([False, True, False]))
    assert isinstance(t, Chunks) and t.doc_index == [1] and t.input_ids.shape == (1, 31)


def test_chunk_forget_set(tokenizer):
    fs = _fs(forget=[DIGIT * 40], retain=[DIGIT * 30], unseen=[DIGIT * 20])
    chunks = chunk_forget_set(fs, tokenizer, seq_len=32)
    assert chunks.general is None
    assert [r for r, _ in chunks.items()] == ["forget", "retain", "unseen"]  # no retain_eval here: a set of old
    assert [c.n_tokens for _, c in chunks.items()] == [32, 31, 21]  # forget's 9-token tail dropped
    fs = _fs(forget=[DIGIT * 40], retain=[DIGIT * 30], unseen=[DIGIT * 20], general=[DIGIT * 3])
    with pytest.raises(DataError, match="the general set is empty after chunking"):
        chunk_forget_set(fs, tokenizer, seq_len=32)
    fs = _fs(forget=[DIGIT * 40], retain=[DIGIT * 30], unseen=[DIGIT * 20], general=[DIGIT * 20])
    assert [r for r, _ in chunk_forget_set(fs, tokenizer, seq_len=32).items()] == [r for r in ROLES if r != "retain_eval"]
    fs = replace(fs, retain_eval=[DIGIT * 20])
    assert [r for r, _ in chunk_forget_set(fs, tokenizer, seq_len=32).items()] == list(ROLES)
