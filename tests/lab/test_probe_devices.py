"""studies.running.probe (the heavy checks, in a child process, answered as one JSON line) and
studies.running.devices (GPUs through NVML, CPUs through psutil: quick, and never an exception)."""
from __future__ import annotations

import json
import subprocess
import sys

from studies.running.devices import DeviceReport, cpu, gpus, probe_devices
from studies.running.probe import count_tokens, probe_model, source_summary
from tests.conftest import SEQ_LEN


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text


def test_probe_model_loads_config_and_tokenizer(tiny_model_dir):
    answer = probe_model(str(tiny_model_dir), timeout=120)
    assert answer["ok"], answer
    assert answer["model_type"] == "llama"
    assert answer["vocab_size"] == answer["tokenizer_vocab"] == 300
    assert 1_000 < answer["parameters"] < 1_000_000  # built on the meta device: a 2-layer, hidden-32 Llama


def test_probe_model_missing_path_is_one_line(tmp_path):
    answer = probe_model(str(tmp_path / "no-such-model"), timeout=60)
    assert answer == {"ok": False, "error": f"no such model folder: {tmp_path / 'no-such-model'}"}


def test_probe_model_folder_without_config_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    answer = probe_model(str(tmp_path / "empty"), timeout=120)
    assert answer["ok"] is False and one_line(answer["error"]), answer
    assert "config" in answer["error"]


def test_probe_prints_one_json_line_and_exit_code():
    proc = subprocess.run([sys.executable, "-m", "studies.running.probe", "count", "--role", "forget"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"ok": False, "error": "--role takes ROLE=SOURCE, not 'forget'"}


def test_count_documents_tokens_and_chunks(forget_set_files, tiny_model_dir, tiny_sets):
    f = forget_set_files
    answer = count_tokens({"forget": [f["forget"]], "retain": [f["retain"]], "unseen": [f["unseen"]]},
                          tokenizer=str(tiny_model_dir), seq_len=SEQ_LEN, timeout=120)
    assert answer["ok"], answer
    roles = answer["roles"]
    assert set(roles) == {"forget", "retain", "unseen"}
    assert {r: roles[r]["documents"] for r in roles} == {"forget": 16, "retain": 32, "unseen": 16}
    # The engine's own chunking of the same texts, with the same tokenizer. The probe counts the
    # sources as given; the forget set holds a seeded share of the retain documents out as retain_eval
    # (chunked per document), so the retain sources are its retain and retain_eval together.
    sets = {"forget": [tiny_sets.forget], "retain": [tiny_sets.retain, tiny_sets.retain_eval],
            "unseen": [tiny_sets.unseen]}
    assert len(tiny_sets.retain) and len(tiny_sets.retain_eval)
    for role in roles:
        assert roles[role]["chunks"] == sum(len(c) for c in sets[role])
        assert roles[role]["tokens"] == sum(c.n_tokens for c in sets[role])


def test_count_without_tokenizer_gives_documents_only(forget_set_files):
    answer = count_tokens({"forget": [forget_set_files["forget"], forget_set_files["unseen"]]}, timeout=60)
    assert answer["ok"], answer
    assert answer["roles"] == {"forget": {"documents": 32, "tokens": None, "chunks": None}}


def test_count_bad_jsonl_line_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    answer = count_tokens({"forget": [str(bad)]}, timeout=60)
    assert answer["ok"] is False and one_line(answer["error"])
    assert answer["error"].startswith(f"forget: {bad}:2: not JSON")


def test_source_summary_reads_local_files_here(forget_set_files):
    answer = source_summary(forget_set_files["retain"], n=3, chars=20)
    assert answer["ok"] and answer["documents"] == 32
    assert len(answer["preview"]) == 3 and all(len(t) <= 21 for t in answer["preview"])
    missing = source_summary("/no/such/file.jsonl")
    assert missing == {"ok": False, "error": "no such file or folder: /no/such/file.jsonl"}


def test_source_summary_reads_hf_sources_in_a_child(tmp_path):
    import datasets

    texts = ["the first document", "the second one", "a third"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(str(tmp_path / "ds"))
    answer = source_summary(f"hf:{tmp_path / 'ds'}/train#body", timeout=120)
    assert answer == {"ok": True, "source": f"hf:{tmp_path / 'ds'}/train#body", "documents": 3, "preview": texts}
    wrong = source_summary(f"hf:{tmp_path / 'ds'}/test", timeout=120)
    assert wrong == {"ok": False, "error": f"hf:{tmp_path / 'ds'}/test: no split 'test'; splits: train"}


def test_a_probe_that_runs_past_its_timeout_is_stopped(forget_set_files, tiny_model_dir):
    answer = count_tokens({"forget": [forget_set_files["forget"]]}, tokenizer=str(tiny_model_dir), timeout=0.3)
    assert answer == {"ok": False, "error": "no answer after 0.3 s"}
    stopped = probe_model(str(tiny_model_dir), should_stop=lambda: True)
    assert stopped["ok"] is False and stopped["stopped"] is True


# ------------------------------------------------------------------ devices

def test_devices_never_raise_and_say_why_there_is_no_gpu():
    report = probe_devices()
    assert isinstance(report, DeviceReport)
    found, why = gpus()
    if found:  # a machine with GPUs: each one described, and no excuse
        assert why is None and {"index", "name", "memory_free_mib", "utilization_pct"} <= set(found[0])
    else:
        assert why and one_line(why)
        assert why == "nvidia-ml-py is not installed" or why.startswith(("no NVIDIA driver", "NVML", "the NVIDIA"))
        assert report.gpus == [] and report.gpu_note == why
    c = cpu()
    assert c["logical_cores"] >= 1
    assert c["percent"] is None or 0 <= c["percent"] <= 100


def test_without_nvidia_ml_py_the_reason_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    assert gpus() == ([], "nvidia-ml-py is not installed")
    assert probe_devices().gpu_note == "nvidia-ml-py is not installed"
