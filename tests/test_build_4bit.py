"""bench/build_4bit.py on the tiny shape (CPU): the pre-quantized NF4 checkpoint loads through transformers'
bnb loader as Linear4bit modules whose dequantized weights are the random bf16 originals within nf4 error,
gives finite logits, and takes a PEFT LoRA backward with finite gradients.

Needs bitsandbytes (not in the project's CPU venv, so this skips there); run it with
    .venv/bin/python -m pip install --target /tmp/bnbsite --no-deps bitsandbytes==0.50.2
    PYTHONPATH=/tmp/bnbsite .venv/bin/python -m pytest -m integration tests/test_build_4bit.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def build_4bit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import build_4bit
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return build_4bit


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_prequantized_checkpoint_loads_and_trains(build_4bit: Any, tmp_path: Path, tied: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path / "m"
    originals: dict[str, Any] = {}
    shape = dict(build_4bit.SHAPES["tiny"], tie_word_embeddings=tied)
    res = build_4bit.build(shape, out, originals=originals)

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and not qc["load_in_8bit"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["bnb_4bit_quant_storage"] == "uint8"
    assert cfg["tie_word_embeddings"] is tied and cfg["vocab_size"] == 258
    # Every tensor is indexed with its size, and the logical parameter count is the bf16 model's.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    assert {f for f in index["weight_map"].values()} == {p.name for p in out.glob("*.safetensors")}
    qkeys = {k.split("q_proj.weight", 1)[1] for k in index["weight_map"] if "layers.0.self_attn.q_proj.weight" in k}
    assert qkeys == {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                     ".quant_state.bitsandbytes__nf4"}
    with torch.device("meta"):
        ref = Qwen2ForCausalLM(Qwen2Config.from_pretrained(out))
    assert res["params"] == sum(p.numel() for p in ref.parameters())

    # (1) transformers' own bnb loader, CPU: no missing or unexpected keys, Linear4bit everywhere.
    model, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not any(info.values()), info
    linears = {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    assert len(linears) == 7 * 2 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    for name, mod in linears.items():
        w = originals[f"{name}.weight"]
        got = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert got.shape == w.shape and got.dtype == torch.bfloat16
        # Exactly what quantizing the original gives, and that is the original within nf4 error.
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                        quant_storage=torch.uint8)
        assert torch.equal(got, bnbf.dequantize_4bit(packed, qs)), name
        err = (got.float() - w.float()).abs()
        assert err.max() <= 0.25 * w.float().abs().max(), name
        assert err.mean() <= 0.12 * w.float().abs().mean(), name
    sd = model.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(sd[key], originals.get(key, sd[key])), key
    assert torch.equal(model.lm_head.weight, originals["model.embed_tokens.weight" if tied else "lm_head.weight"])

    # (2) + (3) LoRA r=16 on the 7 projections: a train-mode forward with finite logits, then a backward with
    # finite, non-zero adapter grads; an eval forward last. Order matters on CPU only: bitsandbytes repacks a
    # Linear4bit's weight in place at its first eval no-grad CPU forward (AVX512-BF16 layout), after which a
    # training forward through a biased Linear4bit (q/k/v) fails with an in-place bias add on a leaf view.
    ids = torch.randint(2, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS,
                                                  task_type="CAUSAL_LM"))
    peft_model.train()
    fwd = peft_model(input_ids=ids, labels=ids)
    assert fwd.logits.shape == (2, 16, 258) and torch.isfinite(fwd.logits).all() and torch.isfinite(fwd.loss)
    fwd.loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert len(grads) == 2 * 7 * 2 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.integration
def test_cli_builds_atomically(build_4bit: Any, tmp_path: Path) -> None:
    out = tmp_path / "tiny4"
    cmd = [sys.executable, str(ROOT / "bench" / "build_4bit.py"), "--shape", "tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["mode"] == "build4" and row["shape"] == "tiny" and row["params"] > 0
    assert row["bytes_on_disk"] == sum(f.stat().st_size for f in out.iterdir())
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not out.with_name("tiny4.tmp").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr
