"""Hub models: an id loads through the Hugging Face cache (HF_HOME), from the cache alone when the
hub cannot be reached; a missing, private or gated model is one line that says what to do; no
token is ever taken from a flag."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from engine.models import describe_load_error
from tests.studies_helpers import cli_cmd


def hf_cache_with(tiny_model_dir, home, repo: str) -> None:
    """The cache layout huggingface_hub writes for `repo` at one revision (refs/main → snapshot)."""
    org, name = repo.split("/")
    base = home / "hub" / f"models--{org}--{name}"
    snap = base / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123456789abcdef")


def run_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "UNLEARN_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "UNLEARN_HOME": str(tmp_path / "home"), **extra}


def test_a_hub_id_in_the_cache_runs_offline(tmp_path, tiny_model_dir, forget_set_files):
    hf_cache_with(tiny_model_dir, tmp_path / "hf", "unlearn-test/tiny-llama")
    f = forget_set_files
    args = ["run", "--model", "unlearn-test/tiny-llama", "--forget", f["forget"], "--retain", f["retain"],
            "--unseen", f["unseen"], "--method", "ga", "--lr", "1e-3", "--steps", "1", "--seq-len", "128", "--json"]
    for offline in ({"HF_HUB_OFFLINE": "1"}, {}):  # said, or found (this box has no route to the hub)
        p = subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=run_env(tmp_path, **offline),
                           cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout)["model"] == "unlearn-test/tiny-llama"
        # found offline, nothing asks the hub (transformers asked for adapter_config.json: 25 s of retries)
        assert "thrown while requesting" not in p.stderr, p.stderr[-2000:]


def test_a_model_missing_from_the_cache_offline_is_one_line(tmp_path, forget_set_files):
    f = forget_set_files
    p = subprocess.run(cli_cmd("run", "--model", "unlearn-test/not-there", "--forget", f["forget"], "--retain", f["retain"],
                               "--unseen", f["unseen"], "--method", "ga", "--lr", "1e-3", "--steps", "1"),
                       capture_output=True, text=True, env=run_env(tmp_path, HF_HUB_OFFLINE="1"), cwd=tmp_path, timeout=300)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == ["error: tokenizer 'unlearn-test/not-there' is not in the Hugging Face cache (HF_HOME) and the "
                     "hub cannot be reached or HF_HUB_OFFLINE is set: download it where there is network "
                     "(hf download unlearn-test/not-there) and copy the cache, or give a local folder"]


def test_gated_and_missing_models_say_what_to_do():
    # transformers wraps huggingface_hub's errors in an OSError whose text names the cause
    gated = OSError("You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/meta-llama/Llama-3.1-8B.")
    assert describe_load_error("model", "meta-llama/Llama-3.1-8B", gated) == (
        "model 'meta-llama/Llama-3.1-8B' is gated: accept its terms on https://huggingface.co/meta-llama/Llama-3.1-8B "
        "and set HF_TOKEN in the environment (or .env)")
    missing = OSError("nobody/nothing is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'")
    assert describe_load_error("tokenizer", "nobody/nothing", missing).startswith("no tokenizer 'nobody/nothing': not a local folder")
    assert describe_load_error("model", "m", ValueError("odd\nmore")) == "cannot load model 'm': odd"


def test_no_command_takes_a_token_flag():
    p = subprocess.run([sys.executable, "-m", "tui.cli", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert "--token" not in p.stdout and "--hf-token" not in p.stdout
