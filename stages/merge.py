"""merge: fold a stage's LoRA into 16-bit weights, check parity, write sharded safetensors.

    python -m stages.merge stage1
    python -m stages.merge stage2

The adapter is merged into the 16-bit original weights (for a QLoRA run, the dequantized base:
never into 4-bit). Parity: logits of base+adapter and of the merged model on fixed Korean and
English prompts must agree within `merge.parity_max_abs` (max |Δlogit|) and `merge.parity_max_kl`
(mean KL per token), both computed in fp32 before the cast to `merge.save_dtype`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from kmed.config import Params, load_params, resolved_dict
from kmed.doctor import preflight
from kmed.io import StageError, atomic_dir, lineage, run_stage, write_json
from kmed.tracking import Tracker

log = logging.getLogger("stages.merge")

PARITY_PROMPTS = (
    "### Question:\n65세 남성이 갑작스러운 흉통과 식은땀을 호소합니다. 가장 먼저 시행할 검사는?\n\n### Response:\n",
    "### Question:\nA 30-year-old woman has fatigue and a low ferritin. What is the likely diagnosis?\n\n### Response:\n",
    "다음 한국어 문장을 영어로 번역하세요.\n\n하루 세 번 식후에 복용하세요.",
)


def merge_base(stage: str, params: Params) -> Path:
    """The 16-bit weights the stage's adapter sits on."""
    if stage == "stage2" and params.sft_stage2.init == "merge_then_new_adapter":
        return Path("models/stage1/merged")
    return Path("models/base")


def fixed_logits(model: Any, tok: Any) -> list[Any]:
    import torch

    dev = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=tok(p, return_tensors="pt")["input_ids"].to(dev)).logits.float().cpu()
                for p in PARITY_PROMPTS]


def parity(ref: list[Any], new: list[Any]) -> dict[str, float]:
    """max |Δlogit| and the worst prompt's mean per-token KL(ref || new)."""
    import torch

    max_abs, kls = 0.0, []
    with torch.no_grad():
        for a, b in zip(ref, new, strict=True):
            max_abs = max(max_abs, (a - b).abs().max().item())
            la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            kls.append((la.exp() * (la - lb)).sum(-1).mean().item())
    return {"parity_max_abs": max_abs, "parity_kl": max(kls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["stage1", "stage2"])
    stage = ap.parse_args().stage

    # Config.
    params = load_params()
    preflight(f"merge@{stage}", params)
    mc = params.merge
    sec = {"merge": resolved_dict(mc), "model": resolved_dict(params.model), f"sft_{stage}": resolved_dict(params.sft(stage))}
    log.info("merge %s: resolved config %s", stage, json.dumps(sec, ensure_ascii=False))
    import torch
    from peft import PeftModel

    from kmed.modeling import load_causal_lm, load_tokenizer

    base_dir, adapter = merge_base(stage, params), Path(f"models/{stage}/adapter")
    for need in (base_dir / "config.json", adapter / "adapter_model.safetensors"):
        if not need.exists():
            raise StageError(f"{need} is missing; run the earlier stages first (`dvc repro`).")
    t0 = time.time()

    # Model: 16-bit original weights in fp32 + adapter (QLoRA adapters merge into the dequantized base).
    tok = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, dtype=torch.float32, trust_remote_code=params.model.trust_remote_code)
    peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    peft_model.eval()
    ref = fixed_logits(peft_model, tok)
    merged = peft_model.merge_and_unload()  # in place: no second copy of a 32B model
    merged.eval()

    # Parity, in fp32, before the cast.
    par = parity(ref, fixed_logits(merged, tok))
    log.info("parity: %s (bounds max_abs %.3g, kl %.3g)", par, mc.parity_max_abs, mc.parity_max_kl)
    if par["parity_max_abs"] > mc.parity_max_abs or par["parity_kl"] > mc.parity_max_kl:
        raise StageError(
            f"merge {stage}: merged logits differ from base+adapter (max_abs {par['parity_max_abs']:.4g} > "
            f"{mc.parity_max_abs} or KL {par['parity_kl']:.3g} > {mc.parity_max_kl}); nothing written."
        )

    # Save: sharded safetensors + tokenizer + chat template + generation config, atomically.
    dtype = torch.bfloat16 if mc.save_dtype == "bf16" else torch.float16
    merged = merged.to(dtype)
    merged.generation_config.eos_token_id = tok.eos_token_id
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.config.eos_token_id, merged.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    out = Path(f"models/{stage}/merged")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=mc.max_shard_size)
        tok.save_pretrained(str(tmp))
        adapter_lineage = json.loads((adapter / "lineage.json").read_text()) if (adapter / "lineage.json").exists() else {}
        write_json(tmp / "lineage.json", lineage(f"merge-{stage}", {**adapter_lineage.get("params", {}), **sec},
                                                  merged_from=str(base_dir), adapter=str(adapter), **par))

    # Metrics.
    metrics = {**par, "save_dtype_bits": 16, "seconds": round(time.time() - t0, 1),
               "size_mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 1)}
    write_json(f"metrics/merge-{stage}.json", metrics)
    with Tracker(params.mlflow, f"merge-{stage}", sec) as tr:
        tr.log_metrics(metrics)
        tr.log_artifact(f"metrics/merge-{stage}.json")
    log.info("merged %s into %s: %s", adapter, out, metrics)


if __name__ == "__main__":
    run_stage(main)
