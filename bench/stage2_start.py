"""Where does stage 2 start? Stage 1's val loss and reasoning format on every model stage 2 could start from.

    python -m bench.stage2_start table --out bench/results/stage2-start-cpu.json   # after `dvc repro merge@stage1`
    python -m bench.stage2_start nf4check                                           # on the GPU machine

`table`, for two base forms, on the CPU in fp32:
- `16-bit`: the embedded base as it ships (bf16 weights) and the pipeline's own stage-1 adapter
  (models/stage1/adapter, trained on it);
- `nf4`: the base's seven projection weights of every layer round-tripped through bitsandbytes NF4 (blocksize 64,
  double quant, as the seed's `unsloth-bnb-4bit` checkpoint holds them), and a stage-1 adapter trained on that
  base here with the project's own `python -m stages.sft stage1` (same params, same data).
Rows: the base; base + adapter (PEFT, unmerged); merged into bf16 (what merge@stage1 writes); merged, then the
projections round-tripped through NF4 (what `merge_then_new_adapter` starts from under `model.load_in_4bit`); the
base in NF4 + the adapter (what `new_adapter_on_stage1` starts from under 4-bit). Columns: val1 loss on stage 1's
val split, `stage1_retained` = (base - row) / (base - base+adapter), and the share of `samples` seeded sampled
generations on the held-out medical prompts that are reasoned R1 answers (`format_ok` with evaluate.min_think_tokens).

`nf4check`: bitsandbytes' CPU quantize/dequantize against its CUDA path on the same bf16 tensors (packed codes,
absmax, dequantized values): the CPU table's round trip is the GPU's, bit for bit, or the numbers say by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_roundtrip(w: Any) -> Any:
    """W as bitsandbytes NF4 (blocksize 64, double-quantized absmax) holds it, dequantized, in W's dtype."""
    import bitsandbytes.functional as bnbf
    import torch

    src = w.to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(src, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state).to(w.dtype)


def projections(model: Any) -> list[Any]:
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ and hasattr(m, "weight")]


def round_trip_in_place(model: Any) -> None:
    import torch

    with torch.no_grad():
        for m in projections(model):
            m.weight.copy_(nf4_roundtrip(m.weight))


def load(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def merged_bf16(base: Any, adapter: Path) -> Any:
    """W + s·B·A in fp32, cast to bf16 and back (merge@stage1's arithmetic), in a copy of `base`."""
    import copy

    import torch
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    model = peft.merge_and_unload()
    with torch.no_grad():
        for m in projections(model):
            m.weight.copy_(m.weight.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def with_adapter(base: Any, adapter: Path) -> Any:
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()


def measure(model: Any, tok: Any, params: Any, val: list[dict[str, Any]], questions: list[str]) -> dict[str, float]:
    from kmed.evaluation import check_format, sample_mean
    from kmed.lm import encode_records, masked_loss, sample_generate
    from kmed.prompt import Prompter, decoding

    loss = masked_loss(model, encode_records(tok, val, params.model.max_seq_length), 8, tok.pad_token_id)["loss"]
    ec = params.evaluate
    prompter = Prompter(params.data.prompt_format, params.data.system_prompt, tok)
    prompts = [prompter.prompt(q) for q in questions]
    dec = decoding(params.generate, ROOT / "models/base")
    seeds = [ec.seed + j for j in range(ec.samples)]
    outs = sample_generate(model, tok, prompts, ec.max_new_tokens, 16, dec, seeds, desc="medical generate")

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    ok = [[check_format(prompter.as_generated(p, o["text"]), ec.min_think_tokens, count)["ok"] for o in row]
          for p, row in zip(prompts, outs, strict=True)]
    mean, lo, hi = sample_mean(ok, ec.seed)
    return {"val1_loss": loss, "format_ok": mean, "format_ok_lo": lo, "format_ok_hi": hi}


def train_stage1_on(base_dir: Path, work: Path) -> Path:
    """The project's own sft-stage1 in a scratch workdir whose models/base is `base_dir`."""
    for rel in ("params.yaml",):
        shutil.copy(ROOT / rel, work / rel)
    shutil.copytree(ROOT / "data/processed", work / "data/processed")
    (work / "models").mkdir(exist_ok=True)
    shutil.copytree(base_dir, work / "models/base")
    env = dict(os.environ, PYTHONPATH=str(ROOT), KMED_MLFLOW="0")
    subprocess.run([sys.executable, "-m", "stages.sft", "stage1"], cwd=work, env=env, check=True)
    return work / "models/stage1/adapter"


def cmd_table(a: argparse.Namespace) -> None:
    import torch

    from kmed.config import load_params
    from kmed.io import read_jsonl
    from kmed.modeling import load_tokenizer

    torch.manual_seed(0)
    params = load_params(ROOT / "params.yaml")
    tok = load_tokenizer(ROOT / "models/base")
    val = read_jsonl(ROOT / "data/processed/stage1/val.jsonl")
    questions = [r["question"] for r in val][: params.evaluate.gen_limit]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as td:
        for form in a.forms:
            t0 = time.time()
            base = load(ROOT / "models/base")
            adapter = ROOT / "models/stage1/adapter"
            if form == "nf4":
                round_trip_in_place(base)
                bdir = Path(td) / "nf4-base"
                base.to(torch.bfloat16).save_pretrained(str(bdir), safe_serialization=True)
                base.to(torch.float32)
                for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
                    if (ROOT / "models/base" / f).exists():
                        shutil.copy(ROOT / "models/base" / f, bdir / f)
                work = Path(td) / "nf4-work"
                work.mkdir()
                adapter = train_stage1_on(bdir, work)
            variants = {
                "base": lambda b=base: b,
                "base + adapter": lambda b=base, ad=adapter: with_adapter(b, ad),
                "merged bf16": lambda b=base, ad=adapter: merged_bf16(b, ad),
                "merged bf16 -> NF4 (merge_then_new_adapter, 4-bit)": lambda b=base, ad=adapter: _nf4(merged_bf16(b, ad)),
                "NF4 base + adapter (new_adapter_on_stage1, 4-bit)": lambda b=base, ad=adapter: with_adapter(_nf4_copy(b), ad),
            }
            res = {}
            for name, make in variants.items():
                res[name] = measure(make(), tok, params, val, questions)
                print(json.dumps({"form": form, "model": name, **res[name]}), flush=True)
            gain = res["base"]["val1_loss"] - res["base + adapter"]["val1_loss"]
            for name, r in res.items():
                r["stage1_retained"] = (res["base"]["val1_loss"] - r["val1_loss"]) / gain if gain else None
                rows.append({"form": form, "model": name, **r})
            print(json.dumps({"form": form, "secs": round(time.time() - t0, 1)}), flush=True)
    out = {"params": {"samples": params.evaluate.samples, "min_think_tokens": params.evaluate.min_think_tokens,
                      "prompts": len(questions), "max_new_tokens": params.evaluate.max_new_tokens},
           "cpu": _cpu_flags(), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(rows))


def _nf4(model: Any) -> Any:
    round_trip_in_place(model)
    return model


def _nf4_copy(model: Any) -> Any:
    import copy

    return _nf4(copy.deepcopy(model))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| base form | model stage 2 would start from | val1 loss | stage1_retained | format_ok [95 %] |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        ret = f"{r['stage1_retained']:.3f}" if r.get("stage1_retained") is not None else "–"
        lines.append(f"| {r['form']} | {r['model']} | {r['val1_loss']:.4f} | {ret} | "
                     f"{r['format_ok']:.2f} [{r['format_ok_lo']:.2f}, {r['format_ok_hi']:.2f}] |")
    return "\n".join(lines)


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags)


def cmd_nf4check(a: argparse.Namespace) -> None:
    import bitsandbytes.functional as bnbf
    import torch

    torch.manual_seed(0)
    rows = []
    for shape in ((3584, 3584), (18944, 3584), (576, 1536)):
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        got = {}
        for dev in ("cpu", "cuda"):
            packed, st = bnbf.quantize_4bit(w.to(dev), blocksize=64, compress_statistics=True, quant_type="nf4",
                                            quant_storage=torch.uint8)
            deq = bnbf.dequantize_4bit(packed, st)
            got[dev] = (packed.cpu(), st.absmax.cpu(), deq.float().cpu())
        c, g = got["cpu"], got["cuda"]
        rows.append({"shape": list(shape), "codes_equal": float((c[0] == g[0]).float().mean()),
                     "absmax_equal": float((c[1] == g[1]).float().mean()),
                     "dequant_max_abs_diff": float((c[2] - g[2]).abs().max()),
                     "roundtrip_max_abs_err": float((c[2] - w.float()).abs().max())})
    print(json.dumps({"mode": "nf4check", "device": torch.cuda.get_device_name(0), "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("table")
    p.add_argument("--out", required=True)
    p.add_argument("--forms", nargs="+", default=["16-bit", "nf4"], choices=["16-bit", "nf4"])
    p.set_defaults(fn=cmd_table)
    p = sub.add_parser("nf4check")
    p.set_defaults(fn=cmd_nf4check)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
