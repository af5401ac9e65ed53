"""The quantization attack's bitsandbytes path on CUDA, where `--quant-backend auto` takes it: NF4 and
LLM.int8 copies of a Llama-shaped model (random weights, hidden 256) held to the float64 references of
the two formats (tests/engine/quant_reference.py, the references the CPU tests use), and one
`attack_milestone` on the GPU that must report `bitsandbytes nf4` / `bitsandbytes llm.int8` with a finite
forget perplexity. Run by bench/device_checks.sh; prints one JSON object.

    python bench/quant_attack_device.py [--json] [--cpu]

--cpu runs the same path on the CPU (bitsandbytes' portable kernels, the backend named explicitly, since
`auto` is round-to-nearest there): its test runs it so.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="run the path on the CPU (the test does)")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.data import Chunks, ForgetSetChunks
    from engine.quant_bnb import available, bitsandbytes_copy
    from engine.recovery import attack_milestone, quantized_layers
    from tests.engine.quant_reference import computed_weight, ref_int8, ref_nf4

    if not available():
        print(json.dumps({"skipped": "bitsandbytes is not installed"}))
        return 0
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(device).eval()
    layers = quantized_layers(model)
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "layers": len(layers)}
    for bits, ref in ((4, ref_nf4), (8, ref_int8)):
        q = bitsandbytes_copy(model, bits, layers)
        worst = 0.0
        for name, module, _ in layers:
            w = module.weight.detach().cpu()
            level = w.half().double().abs().amax(1, keepdim=True) / 127 if bits == 8 else None
            diff = (computed_weight(q.get_submodule(name)) - ref(w)).abs()
            worst = max(worst, float((diff / level).max()) if bits == 8 else float(diff.max()))
        out["nf4_max_abs_error" if bits == 4 else "int8_max_levels_off"] = worst
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (16, 48), generator=g)
    mask = torch.ones_like(ids)
    chunks = Chunks(ids, mask, [""] * 16, list(range(16)))
    sets = ForgetSetChunks(chunks.subset(range(8)), chunks.subset(range(8, 12)), chunks.subset(range(12, 16)), None)
    metrics = {"ppl_forget": 2.0 * config.vocab_size}
    fields, _ = attack_milestone(model, sets, ("quant4", "quant8"), metrics, {"ppl_forget": float(config.vocab_size)},
                                 lr=1e-4, batch_size=4, seed=0, eval_batch_size=8, min_k=0.2, tol_forget=0.1,
                                 quant_backend_choice="auto" if device == "cuda" else "bitsandbytes")
    out["how"] = {a: fields["attacks"][a]["how"] for a in ("quant4", "quant8")}
    out["ppl_forget"] = {a: fields["attacks"][a]["ppl_forget"] for a in ("quant4", "quant8")}
    ok = (out["nf4_max_abs_error"] < 1e-5 and out["int8_max_levels_off"] <= 1.001
          and out["how"] == {"quant4": "bitsandbytes nf4", "quant8": "bitsandbytes llm.int8"}
          and all(math.isfinite(v) for v in out["ppl_forget"].values()))
    out["ok"] = ok
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
