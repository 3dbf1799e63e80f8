"""merge: fold a stage's LoRA into 16-bit weights, streaming, and write sharded safetensors.

    python -m stages.merge stage1
    python -m stages.merge stage2

The base is read tensor by tensor (kmed/merging.py): each LoRA target gets W + (B @ A) * scaling in fp32,
every tensor is cast to `merge.save_dtype` and written into shards of at most `merge.max_shard_size`, so
memory is about one shard + the adapter whatever the model size (not the whole model in fp32). A base that
exists only as bitsandbytes 4-bit weights is dequantized weight by weight (`merge.dequantize_4bit`) and the
output says it is lossy against the original 16-bit model.

Checks, any of which fails the stage with one sentence and nothing written:
- probe: every merged module, read back from the written file, against base + adapter on fixed random
  vectors (worst relative error <= `merge.probe_max_rel`), at every size;
- parity: logits of base+adapter (PEFT) and of the merged weights on fixed Korean and English prompts agree
  within `merge.parity_max_abs` (max |Δlogit|) and `merge.parity_max_kl` (mean KL per token), both in fp32
  before the cast; run when the base has at most `merge.parity_max_params_b` billion parameters, else
  skipped with a warning and `parity_skipped: 1` in the metrics.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
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


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss alone: Linux carries it across fork+exec, so a
    stage started by a 1.4 GB process would report at least 1.4 GB (seen with bench/bench_merge.py)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # macOS: bytes; BSD: KiB


def merge_base(stage: str, params: Params) -> Path:
    """The 16-bit weights the stage's adapter sits on."""
    if stage == "stage2" and params.sft_stage2.init == "merge_then_new_adapter":
        return Path("models/stage1/merged")
    return Path("models/base")


def fixed_logits(model: Any, tok: Any) -> list[Any]:
    import torch

    dev = next(model.parameters()).device
    with torch.no_grad():
        return [
            model(input_ids=tok(p, return_tensors="pt")["input_ids"].to(dev)).logits.float().cpu()
            for p in PARITY_PROMPTS
        ]


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


def full_parity(
    base: Any, adapter_dir: Path, adapter: Any, tok: Any, trust_remote_code: bool
) -> dict[str, float]:
    """Logits of base+adapter through PEFT vs the same fp32 base with our merge applied in place."""
    from peft import PeftModel

    from kmed.merging import fp32_model, merge_in_place

    peft_model = PeftModel.from_pretrained(
        fp32_model(base, trust_remote_code), str(adapter_dir), is_trainable=False
    )
    peft_model.eval()
    ref = fixed_logits(peft_model, tok)
    # The base modules back with their weights untouched (and biases as the adapter loaded them).
    model = peft_model.unload()
    merge_in_place(model, adapter)
    par = parity(ref, fixed_logits(model, tok))
    del peft_model, model
    gc.collect()
    return par


def write_model_files(out: Path, base: Any, tok: Any, save_dtype: str, trust_remote_code: bool,
                      template: str, dec: dict[str, Any]) -> None:
    """config.json (the saved dtype, no quantization), the generation config with the decoding defaults,
    the tokenizer and the chat template the model was trained with (kmed/prompt.py)."""
    from transformers import AutoConfig, GenerationConfig

    from kmed.merging import torch_dtype

    cfg = AutoConfig.from_pretrained(str(base.folder), trust_remote_code=trust_remote_code)
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    cfg = type(cfg).from_dict(d)
    cfg.dtype = torch_dtype(save_dtype)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    cfg.save_pretrained(str(out))
    if (base.folder / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(str(base.folder))
    else:
        gen = GenerationConfig.from_model_config(cfg)
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    # Greedy defaults carry no sampling knobs (transformers refuses to save temperature etc. without do_sample).
    greedy = {"temperature": None, "top_p": None, "top_k": None}
    for k, v in (dec if dec["do_sample"] else {**dec, **greedy}).items():
        setattr(gen, k, v)
    gen.save_pretrained(str(out))
    tok.chat_template = template
    tok.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["stage1", "stage2"])
    stage = ap.parse_args().stage

    # Config.
    params = load_params()
    preflight(f"merge@{stage}", params)
    mc = params.merge
    trust = params.model.trust_remote_code
    sec = {
        "merge": resolved_dict(mc),
        "model": resolved_dict(params.model),
        f"sft_{stage}": resolved_dict(params.sft(stage)),
        "generate": resolved_dict(params.generate),
        "data.prompt_format": params.data.prompt_format,
    }
    log.info("merge %s: resolved config %s", stage, json.dumps(sec, ensure_ascii=False))
    import peft  # noqa: F401  (imported before t0, as before: `seconds` times the merge, not the imports)

    from kmed.config import size_bytes
    from kmed.merging import BaseWeights, read_adapter, stream_merge
    from kmed.modeling import load_tokenizer, refuse_unsafe_model
    from kmed.prompt import chat_template, decoding

    base_dir, adapter_dir = merge_base(stage, params), Path(f"models/{stage}/adapter")
    for need in (base_dir / "config.json", adapter_dir / "adapter_model.safetensors"):
        if not need.exists():
            raise StageError(f"{need} is missing; run the earlier stages first (`dvc repro`).")
    t0 = time.time()

    # Inputs: the base's tensor index (nothing loaded yet), the adapter (small) mapped onto it, the tokenizer.
    refuse_unsafe_model(base_dir, trust)
    base = BaseWeights(base_dir)
    if base.quantization and not mc.dequantize_4bit:
        raise StageError(
            f"{base_dir} holds only {base.quantization} 4-bit weights and merge.dequantize_4bit is false, "
            "so there are no 16-bit weights to merge into (set it to true to dequantize, lossy)."
        )
    if base.quantization:
        log.warning(
            "%s holds %s 4-bit weights: merging into their dequantized values, which are lossy against "
            "the original 16-bit model",
            base_dir,
            base.quantization,
        )
    adapter = read_adapter(adapter_dir, base)
    tok = load_tokenizer(base_dir)
    template = chat_template(params.data.prompt_format, params.data.system_prompt, tok)
    dec = decoding(params.generate, base_dir)
    log.info("chat template: the %s prompt; decoding defaults %s", params.data.prompt_format, dec)
    log.info(
        "base %s: %d tensors, %.3f B params%s; adapter: %s",
        base_dir,
        len(base.entries),
        base.n_params / 1e9,
        f", {base.quantization}" if base.quantization else "",
        adapter.summary,
    )

    # Full-model parity, in fp32 before the cast, where the fp32 model fits the budget.
    metrics: dict[str, Any] = {}
    if base.n_params <= mc.parity_max_params_b * 1e9:
        par = full_parity(base, adapter_dir, adapter, tok, trust)
        log.info("parity: %s (bounds max_abs %.3g, kl %.3g)", par, mc.parity_max_abs, mc.parity_max_kl)
        if par["parity_max_abs"] > mc.parity_max_abs or par["parity_kl"] > mc.parity_max_kl:
            raise StageError(
                f"merge {stage}: merged logits differ from base+adapter (max_abs {par['parity_max_abs']:.4g} > "
                f"{mc.parity_max_abs} or KL {par['parity_kl']:.3g} > {mc.parity_max_kl}); nothing written."
            )
        metrics.update(par, parity_skipped=0)
    else:
        reason = (
            f"base has {base.n_params / 1e9:.2f} B params > merge.parity_max_params_b "
            f"{mc.parity_max_params_b} (fp32 parity needs ~{base.n_params * 4 / 2**30:.0f} GiB)"
        )
        log.warning("full-model logits parity skipped: %s; the per-module probe check still runs", reason)
        metrics.update(parity_skipped=1, parity_skip_reason=reason)

    # Stream: merge tensor by tensor into shards, probe every merged module from the written file; then the
    # config, tokenizer and lineage. All in a temporary sibling, renamed when complete.
    out = Path(f"models/{stage}/merged")
    source = (
        f"{base.quantization} 4-bit, dequantized (lossy against the original 16-bit weights)"
        if base.quantization
        else "16-bit safetensors"
    )
    with atomic_dir(out) as tmp:
        res = stream_merge(base, adapter, tmp, mc.save_dtype, size_bytes(mc.max_shard_size), mc.probe_max_rel)
        log.info(
            "probe: worst relative error %.3g (%s) over %d modules (bound %g)",
            res.probe_max_rel_err,
            res.probe_worst_module,
            res.probe_modules,
            mc.probe_max_rel,
        )
        write_model_files(tmp, base, tok, mc.save_dtype, trust, template, dec)
        adapter_lineage = (
            json.loads((adapter_dir / "lineage.json").read_text())
            if (adapter_dir / "lineage.json").exists()
            else {}
        )
        write_json(
            tmp / "lineage.json",
            lineage(
                f"merge-{stage}",
                {**adapter_lineage.get("params", {}), **sec},
                merged_from=str(base_dir),
                adapter=str(adapter_dir),
                source_weights=source,
                dequantized_from_4bit=bool(base.quantization),
                lossy_vs_original_16bit=bool(base.quantization),
                lora=adapter.summary,
                probe={
                    "max_rel_err": res.probe_max_rel_err,
                    "worst_module": res.probe_worst_module,
                    "modules": res.probe_modules,
                    "bound": mc.probe_max_rel,
                },
                **{k: v for k, v in metrics.items() if k.startswith("parity")},
            ),
        )

    # Metrics.
    metrics.update(
        probe_max_rel_err=res.probe_max_rel_err,
        probe_modules=res.probe_modules,
        dequantized_4bit=int(bool(base.quantization)),
        save_dtype_bits=16,
        shards=res.shards,
        params_b=round(base.n_params / 1e9, 4),
        seconds=round(time.time() - t0, 1),
        size_mb=round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 1),
        peak_rss_mb=peak_rss_mb(),
    )
    write_json(f"metrics/merge-{stage}.json", metrics)
    with Tracker(params.mlflow, f"merge-{stage}", resolved_dict(params)) as tr:
        tr.log_metrics(metrics)
        tr.log_artifact(f"metrics/merge-{stage}.json")
    log.info("merged %s into %s: %s", adapter_dir, out, metrics)


if __name__ == "__main__":
    run_stage(main)
