"""evaluate's parts at real size, per generation engine: generation (prefill and decode), MCQ scoring, val loss.

    python bench/bench_eval_gpu.py run --plan bf16 --out $OUT/eval-gpu.jsonl --budget-s 480
    python bench/bench_eval_gpu.py run --plan tiny --out /tmp/rows.jsonl          # the CPU smoke of the same code
    python bench/bench_eval_gpu.py totals bench/results/eval-gpu-*-2026-12-04.jsonl   # the recipe per target box

Models are random-weight Qwen2.5 / R1-Distill-Qwen shapes (bench/gpu_bench.SHAPES) built directly on the GPU in
bf16 (under a second even at 32B); `nf4` then swaps every decoder linear for a bitsandbytes `Linear4bit` (nf4,
double quant, bf16 compute: the kernels `kmed.modeling.load_for_inference`'s 4-bit path loads), layer by layer.
The tokenizer is the bench's byte-level one (one token per ASCII byte, so prompt lengths are exact).

What each row times (CUDA synchronized, `torch.cuda.max_memory_allocated` reset per row):
- `mcq`: `stages.evaluate.mcq_scores` (the stage's own code) on N items of ~P tokens -> items/s.
- `val`: `kmed.lm.masked_loss` on N records of P tokens (70 % label tokens) -> tokens/s.
- `gen`: one engine on B prompts of P tokens, run twice: with 1 new token (the prefill) and with M; the decode
  step is (t_M - t_1) / (M - 1), at a mean context of P + M/2. Two contexts (P 256 and 1,024) give the step's
  growth with the context (for the static cache: with its length, P + M, at every step).
- `full`: the recipe's medical set as evaluate runs it (64 prompts of 200-400 tokens, 1,024 new, batch 32).
`totals` turns the rows into the recipe's whole evaluate per target box, before (the recipe as shipped: batch 2,
dynamic cache, eager; the measured eager steps) and after (kmed.doctor.evaluate_eta, the model fitted to these rows).
  Engines: `hf` = `kmed.lm.greedy_generate` (today's path: `model.generate`, dynamic cache, left padding);
  `static` = the same loop with `cache_implementation="static"` (transformers compiles the decode step,
  CUDA graphs through mode reduce-overhead); `cb` / `cb-eager` = transformers' continuous batching
  (`generate_batch`, paged KV cache, sdpa), with and without CUDA graphs.
  Parity: each engine's tokens against `hf`'s on the same prompts (rows identical; mean common prefix).

Only the standard library at module level.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from gpu_bench import SHAPES, card_name, make_tokenizer, versions  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
WORDS = "the patient presents with fever cough pain of the chest and a history of herbal decoction use".split()

# A plan is a list of (shape, dtype, kind, engine, batches, extra). gen rows run at both contexts.
PLANS: dict[str, list[tuple[str, str, str, str, tuple[int, ...], dict[str, Any]]]] = {
    "tiny": [
        ("tiny", "fp32", "mcq", "", (4,), {"n": 8}),
        ("tiny", "fp32", "val", "", (2,), {"n": 4}),
        ("tiny", "fp32", "gen", "hf", (2, 4), {}),
        ("tiny", "fp32", "gen", "cb-eager", (4,), {}),
        ("tiny", "fp32", "gen", "static", (4,), {}),
        ("tiny", "fp32", "full", "static", (4,), {"n": 6, "m": 8}),
        ("tiny", "fp32", "parity", "hf", (4,), {}),
        ("tiny", "nf4", "gen", "hf", (2,), {"short": True}),
    ],
    "bf16": [  # the baselines and continuous batching at both sizes first; then what may cost compile time
        ("7b", "bf16", "mcq", "", (8, 32), {"n": 64}),
        ("7b", "bf16", "val", "", (2, 8), {"n": 32}),
        ("7b", "bf16", "gen", "hf", (2, 8, 32, 64), {}),
        ("7b", "bf16", "gen", "cb", (8, 32, 64, 128), {}),
        ("32b", "bf16", "mcq", "", (8, 32), {"n": 64}),
        ("32b", "bf16", "val", "", (2, 8), {"n": 16}),
        ("32b", "bf16", "gen", "hf", (2, 8, 32, 64), {}),
        ("32b", "bf16", "gen", "cb", (8, 32, 64), {}),
        ("7b", "bf16", "gen", "hf", (32,), {"short": True}),
        ("7b", "bf16", "gen", "cb-eager", (32,), {"short": True}),
        ("7b", "bf16", "gen", "static", (32,), {"short": True}),
        ("32b", "bf16", "gen", "hf", (32,), {"short": True}),
        ("32b", "bf16", "gen", "static", (32,), {"short": True, "if_compile_under_s": 90}),
    ],
    "nf4": [  # call 2: the compiled static-cache path at 32B (both contexts, then the recipe's length), nf4, int4
        ("32b", "bf16", "gen", "static", (32,), {}),
        ("32b", "bf16", "full", "static", (32,), {"n": 64, "m": 1024}),
        ("32b", "nf4", "mcq", "", (8,), {"n": 32}),
        ("32b", "nf4", "val", "", (2,), {"n": 8}),
        ("32b", "nf4", "gen", "hf", (2, 8), {}),
        ("32b", "nf4", "gen", "static", (8,), {"short": True}),
        ("7b", "nf4", "gen", "hf", (2, 8, 32), {"short": True}),
        ("7b", "nf4", "gen", "static", (32,), {"short": True}),
        ("7b", "bf16", "parity", "hf", (8,), {}),
        ("32b", "int4", "gen", "static", (8,), {"short": True}),
    ],
}
CONTEXTS = ((256, 65), (1024, 33))  # (prompt tokens, new tokens) per gen measurement; tiny: scaled down


def now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def text(rng: random.Random, n: int) -> str:
    """ASCII text of exactly n bytes (= n tokens of the byte-level tokenizer)."""
    s = ""
    while len(s) < n:
        s += rng.choice(WORDS) + " "
    return s[:n]


def build(shape: str, dtype: str) -> Any:
    """Random-weight Qwen2 of `shape` on the GPU (bf16) or the CPU (fp32, the smoke); nf4 = decoder linears
    swapped for bitsandbytes Linear4bit, one at a time, so the bf16 model is never held twice."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{k: v for k, v in SHAPES[shape].items() if v is not None}, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-5 if shape == "32b" else 1e-6, bos_token_id=0,
                      eos_token_id=1, pad_token_id=1)
    if shape == "tiny":
        cfg.vocab_size = 258
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    if dtype == "int4":  # torchao int4 weight-only, tinygemm layout (aten._weight_int4pack_mm), group 128
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        cfg4 = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        for layer in model.model.layers:
            quantize_(layer, cfg4)
    if dtype == "nf4":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for name in LINEARS:
                parent, attr = layer.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                lin = getattr(parent, attr)
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=True, blocksize=64, module=new).to(lin.weight.device)
                new.bias = lin.bias
                setattr(parent, attr, new)
                del lin
            if cuda:
                torch.cuda.empty_cache()
    return model.eval()


# ------------------------------------------------------------------------------------------------- engines
def gen_hf(model: Any, tok: Any, prompts: list[str], m: int, b: int) -> list[list[int]]:
    from kmed.lm import greedy_generate

    return [o["ids"] for o in greedy_generate(model, tok, prompts, m, b)]


def gen_static(model: Any, tok: Any, prompts: list[str], m: int, b: int) -> list[list[int]]:
    """greedy_generate's loop with a static cache (transformers then compiles the decode step)."""
    import torch

    dev = next(model.parameters()).device
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), b):
        enc = tok(prompts[i : i + b], return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=m, do_sample=False, num_beams=1, cache_implementation="static",
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out += [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                for row in g[:, enc["input_ids"].shape[1] :].tolist()]
    return out


def kv_bytes_per_token(model: Any) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2


def gen_cb(model: Any, tok: Any, prompts: list[str], m: int, b: int, graphs: bool | None,
           kv_tokens: int | None = None) -> list[list[int]]:
    """transformers' continuous batching: at most `b` requests at once, a paged cache of `kv_tokens`."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    ids = tok(prompts, add_special_tokens=True)["input_ids"]
    block = 256 if max(map(len, ids)) + m > 512 else 32
    kv_tokens = kv_tokens or b * (max(map(len, ids)) + m + block)
    cbc = ContinuousBatchingConfig(block_size=block, num_blocks=math.ceil(kv_tokens / block) + 1,
                                   max_batch_tokens=min(2048, b * max(map(len, ids))), max_requests_per_batch=b,
                                   use_cuda_graph=graphs, allow_block_sharing=False)
    gcfg = GenerationConfig(max_new_tokens=m, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    res = model.generate_batch(ids, generation_config=gcfg, continuous_batching_config=cbc, progress_bar=False)
    outs = list(res.values())
    if len(outs) != len(ids) or any(o.error for o in outs):
        raise RuntimeError(f"generate_batch returned {len(outs)} of {len(ids)}: {[o.error for o in outs if o.error][:2]}")
    eos = tok.eos_token_id
    return [o.generated_tokens[: o.generated_tokens.index(eos)] if eos in o.generated_tokens else o.generated_tokens
            for o in outs]


ENGINES = {"hf": gen_hf, "static": gen_static,
           "cb": lambda *a: gen_cb(*a, graphs=True), "cb-eager": lambda *a: gen_cb(*a, graphs=False)}


# ------------------------------------------------------------------------------------------------- measurements
def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_mcq(model: Any, tok: Any, b: int, n: int, p: int) -> dict[str, Any]:
    from stages.evaluate import mcq_scores

    rng = random.Random(0)
    items = [{"question": text(rng, p - 120), "options": {k: text(rng, 14) for k in "ABCDE"}, "answer": "A"}
             for _ in range(n)]
    mcq_scores(model, tok, "", items[:b], b)  # warm-up
    reset_peak()
    t0 = now()
    mcq_scores(model, tok, "", items, b)
    secs = now() - t0
    return {"items": n, "items_s": round(n / secs, 2), "secs": round(secs, 2), "peak_gib": peak_gib()}


def measure_val(model: Any, tok: Any, b: int, n: int, p: int) -> dict[str, Any]:
    from kmed.lm import IGNORE, masked_loss

    g = random.Random(0)
    enc = [{"input_ids": [g.randrange(2, 258) for _ in range(p)], "labels": None} for _ in range(n)]
    for e in enc:
        cut = int(p * 0.3)
        e["labels"] = [IGNORE] * cut + e["input_ids"][cut:]
    masked_loss(model, enc[:b], b, tok.pad_token_id)
    reset_peak()
    t0 = now()
    r = masked_loss(model, enc, b, tok.pad_token_id)
    secs = now() - t0
    return {"records": n, "tokens": n * p, "tok_s": round(n * p / secs, 1), "secs": round(secs, 2),
            "loss": round(r["loss"], 4), "peak_gib": peak_gib()}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    def prefix(x: list[int], y: list[int]) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    return {"rows_identical": round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 3),
            "mean_common_prefix": round(sum(prefix(x, y) for x, y in zip(a, b, strict=True)) / len(a), 1)}


def measure_gen(model: Any, tok: Any, engine: str, b: int, p: int, m: int,
                ref: dict[tuple[int, int, int], list[list[int]]]) -> dict[str, Any]:
    rng = random.Random(1000 * b + p)
    prompts = [text(rng, p) for _ in range(b)]
    fn = ENGINES[engine]
    t0 = now()
    if engine == "static":  # compiles the decode step for this batch and cache length: timed apart
        fn(model, tok, prompts, m, b)
    elif engine == "hf":  # kernels loaded once
        fn(model, tok, prompts[:1], 2, 1)
    first = now() - t0
    reset_peak()
    t0 = now()
    fn(model, tok, prompts, 1, b)
    t1 = now() - t0
    t0 = now()
    out = fn(model, tok, prompts, m, b)
    tm = now() - t0
    new = sum(len(o) for o in out)
    row = {"warmup_s": round(first, 2), "prefill_s": round(t1, 3), "secs": round(tm, 3), "new_tokens": new, "ctx": p + m // 2,
           "step_ms": round(1000 * (tm - t1) / (m - 1), 2), "prefill_tok_s": round(b * p / t1, 1),
           "decode_tok_s": round(b * (m - 1) / (tm - t1), 1), "peak_gib": peak_gib()}
    key = (b, p, m)
    if engine == "hf":
        ref[key] = out
    elif key in ref:
        row.update(agreement(ref[key], out))
    return row


def measure_full(model: Any, tok: Any, engine: str, b: int, n: int, m: int) -> dict[str, Any]:
    """The recipe's medical generation as evaluate runs it: n prompts of 200-400 tokens, m new tokens each,
    batches of b sorted by length; compile (static) included, as a stage pays it."""
    rng = random.Random(7)
    prompts = [text(rng, rng.randint(200, 400)) for _ in range(n)]
    reset_peak()
    t0 = now()
    out = ENGINES[engine](model, tok, prompts, m, b)
    secs = now() - t0
    new = sum(len(o) for o in out)
    return {"prompts": n, "new_tokens": new, "secs": round(secs, 1), "tok_s": round(new / secs, 1),
            "peak_gib": peak_gib()}


def measure_parity(model: Any, tok: Any, b: int, p: int, m: int) -> dict[str, Any]:
    """How far today's own path moves when only the batch changes: hf at batch b against batch 1, same prompts
    (random weights have near-flat logits, so a last-bit difference flips the argmax: the noise floor)."""
    rng = random.Random(1000 * b + p)
    prompts = [text(rng, p) for _ in range(b)]
    return {"vs": "hf batch 1", **agreement(gen_hf(model, tok, prompts, m, 1), gen_hf(model, tok, prompts, m, b))}


def cmd_run(a: argparse.Namespace) -> None:
    import torch

    steps = PLANS[a.plan]
    only = set(a.only.split(",")) if a.only else None
    tokdir = Path(a.tokdir)
    tok = make_tokenizer(tokdir)
    base = {"card": card_name(), "date": time.strftime("%Y-%m-%d"), "libs": versions(), "plan": a.plan}
    t_start, model, loaded, ref, compile_s = time.time(), None, None, {}, {}
    for shape, dtype, kind, engine, batches, extra in steps:
        if only and f"{shape}:{engine or kind}" not in only and engine not in only:
            continue
        if (shape, dtype) != loaded:
            model = None
            torch._dynamo.reset()  # compiled graphs hold the previous model
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            t0 = now()
            model = build(shape, dtype)
            loaded, ref = (shape, dtype), {}
            emit(a.out, {**base, "kind": "build", "shape": shape, "dtype": dtype, "secs": round(now() - t0, 1),
                         "params": sum(p.numel() for p in model.parameters()), "peak_gib": peak_gib()})
        for b in batches:
            ctxs = {"gen": CONTEXTS[:1] if extra.get("short") else CONTEXTS, "mcq": ((400, 0),), "val": ((1000, 0),),
                    "full": ((300, extra.get("m", 0)),), "parity": ((256, 33),)}[kind]
            for p, m in ctxs:
                if shape == "tiny":
                    p, m = max(16, p // 16), max(5, m // 8)
                left = a.budget_s - (time.time() - t_start)
                lim = extra.get("if_compile_under_s")
                if left < 20 or (lim and (compile_s.get("static", 1e9) > lim or left < 3 * lim)):
                    emit(a.out, {**base, "kind": kind, "engine": engine, "shape": shape, "dtype": dtype, "batch": b,
                                 "prompt": p, "skipped": "budget" if left < 20 else f"7b compile {compile_s}"})
                    continue
                row = {**base, "kind": kind, "engine": engine, "shape": shape, "dtype": dtype, "batch": b,
                       "prompt": p, "max_new": m}
                t0 = time.time()
                try:
                    if kind == "mcq":
                        row.update(measure_mcq(model, tok, b, extra["n"], p))
                    elif kind == "val":
                        row.update(measure_val(model, tok, b, extra["n"], p))
                    elif kind == "full":
                        row.update(measure_full(model, tok, engine, b, extra["n"], m))
                    elif kind == "parity":
                        row.update(measure_parity(model, tok, b, p, m))
                    else:
                        row.update(measure_gen(model, tok, engine, b, p, m, ref))
                except Exception as e:  # one failing candidate must not cost the call its other rows
                    row["error"] = f"{type(e).__name__}: {e}"[:600]
                    gc.collect()
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                row["wall_s"] = round(time.time() - t0, 1)
                if engine == "static" and "warmup_s" in row and shape != "tiny":
                    compile_s["static"] = max(compile_s.get("static", 0), row["warmup_s"])
                emit(a.out, row)


# The recipe's evaluate, per model (recipes/r1-32b-medical-ko.yaml with evaluate.samples 4): the full KorMedMCQA
# test (~3,000 items of ~400 tokens), the val splits (assumed 4 M tokens: stage 1's ~1,970 medical-o1 records of
# ~1,000 tokens and stage 2's ~5,000 KoCommercial records of ~400; AI Hub pairs add to it), 64 medical prompts
# (~320 tokens) and 2 x 200 translation prompts (~256), each sampled 4 times, up to 1,024 new tokens.
RECIPE = {"models": 3, "mcq_items": 3000, "mcq_tokens": 3000 * 400, "val_tokens": 4_000_000, "max_new": 1024,
          "gen": [(320, 64 * 4), (256, 200 * 4), (256, 200 * 4)], "checkpoint_bytes": 65.5e9}
BOXES = (("80 GB GPU + 128 GB RAM", "bf16", "H100"), ("24 GB GPU + 64 GB RAM", "nf4", "4090"))


def cmd_totals(a: argparse.Namespace) -> None:
    """The recipe's evaluate per box, before and after, from the measured 32B rows (see RECIPE)."""
    from kmed.doctor import Arch, evaluate_eta

    rows = [json.loads(line) for f in a.results for line in Path(f).read_text().splitlines() if line.strip()]
    arch = Arch.from_config({**SHAPES["32b"], "num_attention_heads": 40, "model_type": "qwen2"})

    def mean(kind: str, dtype: str, key: str, **kw: Any) -> float:
        vals = [r[key] for r in rows if r["kind"] == kind and r["shape"] == "32b" and r["dtype"] == dtype
                and key in r and all(r.get(k) == v for k, v in kw.items())]
        return sum(vals) / len(vals)

    r, seqs = RECIPE, sum(n for _, n in RECIPE["gen"])
    print("| box | weights | before: batch 2, dynamic cache (h) | after: compiled static cache, batch | after on an "
          "H200 (h) | after on the box's card, bandwidth-scaled (h) |")
    print("|---|---|---:|---|---:|---:|")
    for box, w, card in BOXES:
        fwd = (mean("val", w, "tok_s"), mean("mcq", w, "items_s"))
        step = mean("gen", w, "step_ms", engine="hf", batch=2) / 1000  # eager: host-bound, not scaled by card
        before = r["checkpoint_bytes"] / 1e9 + r["val_tokens"] / fwd[0] + r["mcq_items"] / fwd[1]
        before += math.ceil(seqs / 2) * r["max_new"] * step
        batch = 32 if w == "bf16" else 11  # kmed.lm.auto_batch_size on 79.1 / 23.6 GiB (tests/test_lm.py)
        kw = {"models": r["models"], "weights": w, "batch": batch, "mcq_tokens": r["mcq_tokens"],
              "val_tokens": r["val_tokens"], "gen": r["gen"], "max_new_tokens": r["max_new"],
              "checkpoint_bytes": int(r["checkpoint_bytes"])}
        h200, there = evaluate_eta(arch, card="H200", **kw), evaluate_eta(arch, card=card, **kw)
        print(f"| {box} | {w} | {r['models'] * before / 3600:.1f} | {batch} | {h200['total_s'] / 3600:.1f} | "
              f"{there['total_s'] / 3600:.1f} ({card}) |")


def emit(path: str, row: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    short = {k: v for k, v in row.items() if k not in ("libs", "date", "plan", "card")}
    print(json.dumps(short), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--plan", choices=list(PLANS), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--budget-s", type=float, default=480)
    r.add_argument("--only", default="", help="comma list of engines or shape:engine to run (default: the plan)")
    r.add_argument("--tokdir", default="/tmp/bench_eval_tok")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("totals")
    t.add_argument("results", nargs="+")
    t.set_defaults(fn=cmd_totals)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
