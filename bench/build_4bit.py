"""Random-weight, pre-quantized bitsandbytes NF4 (double-quant) Qwen2 checkpoint, built layer by layer.

    python bench/build_4bit.py --shape 32b --out /tmp/models/32b-bnb4    # ~19 GB, never the 65 GB bf16 model

Each decoder layer's 7 linear weights are drawn as bf16 (std 0.02) on CUDA when there is one (else CPU),
quantized with `bitsandbytes.functional.quantize_4bit` (nf4, blocksize 64, compress_statistics=True, uint8
storage) and written in the layout `Linear4bit._save_to_state_dict` writes and transformers' bnb loader
(`Bnb4BitHfQuantizer.get_weight_conversions`) reads back:

    <prefix>.weight                                  packed uint8, shape [out*in/2, 1]
    <prefix>.weight.absmax                           uint8 (the double-quantized absmax)
    <prefix>.weight.quant_map                        float32 [16], the nf4 code
    <prefix>.weight.nested_absmax                    float32
    <prefix>.weight.nested_quant_map                 float32 [256]
    <prefix>.weight.quant_state.bitsandbytes__nf4    uint8, the packed JSON of the non-tensor state

q/k/v biases are bf16 (std 0.02), the layer norms ones; embed_tokens, the final norm and lm_head (untied
shapes only) are bf16 and not quantized. One safetensors shard per layer plus one for the rest, an index,
config.json with `quantization_config` (BitsAndBytesConfig.to_dict()), generation_config.json and the
bench's byte-level tokenizer (bench/gpu_bench.py make_tokenizer). Built in DIR.tmp, then renamed to DIR.
Ends with one JSON line: {"mode": "build4", "shape", "params" (logical, unquantized count), "bytes_on_disk",
"secs"}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import SHAPES as BENCH_SHAPES  # noqa: E402
from gpu_bench import make_tokenizer  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = dict(BENCH_SHAPES)
# DeepSeek-R1-Distill-Qwen-32B (in gpu_bench.SHAPES already; kept here should that table drop it).
SHAPES.setdefault("32b", dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                              num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                              tie_word_embeddings=False))
# tiny: untied like 7b-32b, so the lm_head shard path is the one exercised; vocab = the tokenizer's.
SHAPES["tiny"] = dict(SHAPES["tiny"], tie_word_embeddings=False, vocab_size=None)
RMS_NORM_EPS = {"14b": 1e-5, "32b": 1e-5}  # R1-Distill-Qwen 14B/32B; 1.5B/7B (and gpu_bench build) use 1e-6
STD = 0.02
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def bnb_config() -> dict[str, Any]:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=["lm_head"]).to_dict()


def linear_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder layer's linear."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def rand(shape: tuple[int, ...], dev: str) -> Any:
    import torch

    return torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, STD)


def quantized(prefix: str, w: Any) -> dict[str, Any]:
    """`<prefix>.weight` plus `<prefix>.weight.<k>` for k in quant_state.as_dict(packed=True), on CPU."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    out = {f"{prefix}.weight": packed.cpu()}
    # copy=True: quant_map may be one cached tensor shared by every linear, which safetensors refuses.
    out.update({f"{prefix}.weight.{k}": v.to("cpu", copy=True) for k, v in qs.as_dict(packed=True).items()})
    return out


def build(shape: dict[str, Any], out: Path, rms_norm_eps: float = 1e-6, seed: int = 0,
          originals: dict[str, Any] | None = None, form: str = "nf4") -> dict[str, Any]:
    """Write the checkpoint into `out` (created, must not exist). `originals`, when given, receives every
    written weight's bf16 original on CPU (quantized ones too): for tests on tiny shapes only. `form`: nf4 (the
    pre-quantized checkpoint above) or bf16 (the same random weights, written unquantized: a 16-bit base)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig, Qwen2Config

    out.mkdir(parents=True)
    tok = make_tokenizer(out)
    shape = dict(shape, vocab_size=shape.get("vocab_size") or len(tok))
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=rms_norm_eps,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["Qwen2ForCausalLM"]
    if form == "nf4":
        cfg.quantization_config = bnb_config()
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1).save_pretrained(out)

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, n_layers = shape["hidden_size"], shape["num_hidden_layers"]
    lin = linear_shapes(shape)
    n_shards = n_layers + 1
    weight_map: dict[str, str] = {}
    total_size = 0
    params = 0

    def write(i: int, tensors: dict[str, Any]) -> None:
        nonlocal total_size
        name = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    for layer in tqdm(range(n_layers), desc="layers", unit="layer"):
        p = f"model.layers.{layer}"
        tensors: dict[str, Any] = {}
        for name in LINEARS:
            w = rand(lin[name], dev)
            if originals is not None:
                originals[f"{p}.{name}.weight"] = w.cpu()
            tensors.update(quantized(f"{p}.{name}", w) if form == "nf4" else {f"{p}.{name}.weight": w.cpu()})
            params += w.numel()
            del w
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            tensors[f"{p}.{name}.bias"] = rand((lin[name][0],), "cpu")
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{name}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        params += sum(t.numel() for k, t in tensors.items() if k.endswith((".bias", "layernorm.weight")))
        write(layer + 1, tensors)
        del tensors
        if dev == "cuda":
            torch.cuda.empty_cache()

    rest = {"model.embed_tokens.weight": rand((shape["vocab_size"], h), dev).cpu(),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not shape["tie_word_embeddings"]:
        rest["lm_head.weight"] = rand((shape["vocab_size"], h), dev).cpu()
    params += sum(t.numel() for t in rest.values())
    if originals is not None:
        originals.update(rest)
    write(n_shards, rest)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"params": params, "device": dev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists (removed before building)")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    if out.exists():
        if not a.force:
            raise SystemExit(f"{out} exists (use --force to replace it)")
        shutil.rmtree(out)
    shutil.rmtree(tmp, ignore_errors=True)
    res = build(SHAPES[a.shape], tmp, rms_norm_eps=RMS_NORM_EPS.get(a.shape, 1e-6), seed=a.seed)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(json.dumps({"mode": "build4", "shape": a.shape, "params": res["params"], "bytes_on_disk": size,
                      "device": res["device"], "secs": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
