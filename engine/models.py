"""Loading causal LMs and tokenizers the way a user's model loads, plus tiny configs for tests.

Everything goes through `from_pretrained`, so a local folder (tests, the demo) and a hub id
(a user's GPU box) take the same path. Safety: no remote code unless asked,
safetensors preferred, nothing unpickled.

torch and transformers are imported where a model is loaded, so that checking a model path
(`unlearn study create`) stays light.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import UnlearnError

if TYPE_CHECKING:
    import torch


def quiet_transformers() -> None:
    # transformers draws tqdm bars on every load/save; the CLI draws its own progress.
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnlearnError(f"--device {device}: no CUDA device is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise UnlearnError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return torch.device(device)


def check_local_model(name_or_path: str) -> None:
    # A path-looking name that does not exist would otherwise become a confusing hub lookup.
    looks_local = name_or_path.startswith((".", "/", "~")) or (
        os.sep in name_or_path.rstrip(os.sep) and Path(name_or_path).parent.exists())
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise UnlearnError(f"no such model folder: {name_or_path}")


def hub_kwargs(name_or_path: str) -> dict:
    """from_pretrained's keywords for where the files come from: a local folder as it is; a hub id
    from the cache alone (local_files_only) when the hub cannot be reached, so a box without network
    fails in a second with our line instead of half a minute of retries."""
    if Path(name_or_path).expanduser().exists():
        return {}
    from engine.data import hub_offline_reason

    return {"local_files_only": True} if hub_offline_reason() is not None else {}


@contextlib.contextmanager
def hub_source(name_or_path: str):
    """`hub_kwargs(name_or_path)`, with huggingface_hub's offline switch on while they are used when
    the hub cannot be reached: transformers 5.25 still asks the hub for a model's adapter_config.json
    under local_files_only=True, and on a box without network that was 25 s of retries per load."""
    kwargs = hub_kwargs(name_or_path)
    if not kwargs.get("local_files_only"):
        yield kwargs
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield kwargs
    finally:
        constants.HF_HUB_OFFLINE = saved


def describe_load_error(what: str, name: str, exc: BaseException) -> str:
    """One line for a model or tokenizer that did not load, saying what to do. A hub id goes
    through the Hugging Face cache (HF_HOME); a token comes from HF_TOKEN in the environment only,
    never from a flag, so it cannot show up in a command line, a study or an export."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain).lower()
    if "GatedRepoError" in kinds or "gated repo" in text:
        return (f"{what} {name!r} is gated: accept its terms on https://huggingface.co/{name} and set HF_TOKEN "
                f"in the environment (or .env)")
    if "RepositoryNotFoundError" in kinds or "is not a valid model identifier" in text or "repository not found" in text:
        return (f"no {what} {name!r}: not a local folder and not a model on the Hugging Face hub "
                f"(a private one needs HF_TOKEN in the environment)")
    if {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} & kinds or "offline mode" in text or "cannot find the requested files in the" in text:
        return (f"{what} {name!r} is not in the Hugging Face cache (HF_HOME) and the hub cannot be reached "
                f"or HF_HUB_OFFLINE is set: download it where there is network (hf download {name}) "
                f"and copy the cache, or give a local folder")
    first = str(exc).strip().splitlines()
    return f"cannot load {what} {name!r}: {first[0] if first else type(exc).__name__}"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    check_local_model(name_or_path)
    try:
        with hub_source(name_or_path) as source:
            tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path), trust_remote_code=trust_remote_code,
                                                **source)
    except (OSError, ValueError) as exc:
        raise UnlearnError(describe_load_error("tokenizer", name_or_path, exc)) from None
    if tok.pad_token_id is None:
        # Pad positions never count in a loss or metric, so any id will do; eos is conventional.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(name_or_path: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
               dtype: torch.dtype | None = None):
    """Load a causal LM with weights in `dtype` (default fp32; a run picks it from --dtype, and
    autocasts to bf16 on CUDA either way)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    check_local_model(name_or_path)
    try:
        with hub_source(name_or_path) as source:
            model = AutoModelForCausalLM.from_pretrained(
                os.path.expanduser(name_or_path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                **source)
    except (OSError, ValueError) as exc:
        raise UnlearnError(describe_load_error("model", name_or_path, exc)) from None
    return model.to(device)


def model_key(name_or_path: str) -> str:
    """A cache key that changes when the weights change, without hashing gigabytes.

    Local folders: path + name, size and mtime of every file; hub ids: the id itself
    (revisions pin through the HF cache)."""
    p = Path(name_or_path).expanduser()
    h = hashlib.sha256()
    if p.is_dir():
        h.update(str(p.resolve()).encode())
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(name_or_path.encode())
    return h.hexdigest()[:16]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512, **kw):
    """A Llama-style config small enough to train on two CPU cores in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 4 * 4 or 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **kw,
    )


def read_pretraining_tokens(name_or_path: str) -> int | None:
    """Tokens the model was pretrained on, when known (the demo writes it), for the cost ratio."""
    f = Path(name_or_path).expanduser() / "unlearn_pretraining.json"
    if f.is_file():
        return int(json.loads(f.read_text()).get("tokens", 0)) or None
    return None
