"""CPU benchmark: the streaming merge (`python -m stages.merge stage1`) keeps peak RSS flat as the model grows.

    python bench/bench_merge.py --sizes 0.1,0.5,1.5 --parity-max 0

For each size (billions of params): a random-weight bf16 Qwen2 base (vocab 49152, untied embeddings, SmolLM2
tokenizer from models/base) is written layer by layer into shards in a temp workdir, never whole in memory;
a random PEFT LoRA adapter goes to models/stage1/adapter (bench/gpu_pipeline.py `cmd_adapter`); params.yaml is
the repo's with the bench's overrides; then the stage runs there (PYTHONPATH = repo root), wall-clock timed.
One JSON row per size (the stage's metrics/merge-stage1.json + the CPU) is printed and appended to --results,
and a markdown table closes the run. The full-logits parity holds the base in fp32 at or below
`--parity-max` billion params, which dominates RSS there: `--parity-max 0` measures the stream alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_pipeline import TOKENIZER_FILES, cmd_adapter  # noqa: E402

VOCAB = 49152
# (hidden, intermediate, heads, kv heads): Qwen2 shapes, head_dim 64 or 128.
WIDTHS = [(128, 384, 2, 1), (256, 768, 4, 2), (512, 1536, 8, 2), (896, 4864, 14, 2), (1536, 8960, 12, 2),
          (2048, 11008, 16, 2), (3584, 18944, 28, 4), (5120, 27648, 40, 8)]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def layer_shapes(h: int, inter: int, heads: int, kv: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    kvd = kv * (h // heads)
    shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
              "self_attn.k_proj.weight": (kvd, h), "self_attn.k_proj.bias": (kvd,),
              "self_attn.v_proj.weight": (kvd, h), "self_attn.v_proj.bias": (kvd,),
              "self_attn.o_proj.weight": (h, h), "post_attention_layernorm.weight": (h,),
              "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    return shapes if bias else {k: v for k, v in shapes.items() if not k.endswith(".bias")}


def pick_shape(size_b: float) -> tuple[int, int, int, int, int]:
    """The narrowest width that reaches the size in at most 32 layers: (hidden, inter, heads, kv, layers)."""
    for h, inter, heads, kv in WIDTHS:
        per_layer = sum(torch.Size(s).numel() for s in layer_shapes(h, inter, heads, kv).values())
        layers = max(1, round((size_b * 1e9 - 2 * VOCAB * h - h) / per_layer))
        if layers <= 32:
            break
    return h, inter, heads, kv, layers


def rand(shape: tuple[int, ...], name: str) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape) * 0.02).to(torch.bfloat16)


def build_base(out: Path, h: int, inter: int, heads: int, kv: int, layers: int, llama: bool = False) -> int:
    """Shards of a few layers each (~0.5 GB), written as they are built; returns the number of params.
    `llama`: SmolLM2's own architecture (Llama: no q/k/v biases), whose tokenizer llama.cpp's converter knows."""
    out.mkdir(parents=True)
    shapes = layer_shapes(h, inter, heads, kv, bias=not llama)
    per_shard = max(1, int(5e8 // (2 * sum(torch.Size(s).numel() for s in shapes.values()))))
    groups = [[("model.embed_tokens.weight", (VOCAB, h))]]
    for i in range(layers):
        if i % per_shard == 0:
            groups.append([])
        groups[-1] += [(f"model.layers.{i}.{k}", s) for k, s in shapes.items()]
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))])
    weight_map, total = {}, 0
    for n, group in enumerate(tqdm(groups, desc="build base", unit="shard")):
        fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: rand(shape, name) for name, shape in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    src = json.loads((ROOT / "models/base/config.json").read_text())
    ids = {k: src.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cls = LlamaConfig if llama else Qwen2Config
    cfg = cls(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
              tie_word_embeddings=False, **ids)
    cfg.architectures, cfg.dtype = ["LlamaForCausalLM" if llama else "Qwen2ForCausalLM"], "bfloat16"
    cfg.save_pretrained(str(out))
    GenerationConfig(**ids).save_pretrained(str(out))
    for f in TOKENIZER_FILES:
        shutil.copy(ROOT / "models/base" / f, out / f)
    return total


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "cpu_flags": [f for f in FLAGS if f in flags], "nproc": len(os.sched_getaffinity(0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,0.5,1.5", help="billions of params, comma-separated")
    ap.add_argument("--shard", default="1GB", help="merge.max_shard_size")
    ap.add_argument("--parity-max", type=float, default=2.0, help="merge.parity_max_params_b")
    ap.add_argument("--results", default=str(ROOT / f"bench/results/merge-cpu-{datetime.date.today()}.jsonl"))
    ap.add_argument("--tmp", default=None, help="where the workdirs go (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each workdir")
    a = ap.parse_args()
    cpu, rows = cpu_info(), []
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    for size_b in [float(s) for s in a.sizes.split(",")]:
        h, inter, heads, kv, layers = pick_shape(size_b)
        work = Path(tempfile.mkdtemp(prefix=f"bench-merge-{size_b}b-", dir=a.tmp))
        try:
            t0 = time.time()
            n_params = build_base(work / "models/base", h, inter, heads, kv, layers)
            build_s = time.time() - t0
            params = yaml.safe_load((ROOT / "params.yaml").read_text())
            params["model"]["base"] = "models/base"
            params["merge"].update(max_shard_size=a.shard, parity_max_params_b=a.parity_max)
            params["mlflow"]["enabled"], params["doctor"]["mode"] = False, "warn"
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
            with contextlib.redirect_stdout(sys.stderr):  # its own JSON line: keep stdout to the rows
                cmd_adapter(argparse.Namespace(work=str(work), stage="stage1"))
            env = dict(os.environ, PYTHONPATH=str(ROOT), KMED_MLFLOW="0", PYTHONUNBUFFERED="1")
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "stages.merge", "stage1"], cwd=work, env=env,
                                  capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
            mfile = work / "metrics/merge-stage1.json"
            m = json.loads(mfile.read_text()) if proc.returncode == 0 and mfile.exists() else {}
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
        row = {"bench": "merge-cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "size_b": size_b, "params_b": round(n_params / 1e9, 4), "hidden": h, "intermediate": inter,
               "layers": layers, "heads": heads, "kv_heads": kv, "shard": a.shard, "parity_max_b": a.parity_max,
               "rc": proc.returncode, "wall_s": round(wall, 1), "build_s": round(build_s, 1),
               **{k: m.get(k) for k in ("peak_rss_mb", "probe_max_rel_err", "seconds", "size_mb",
                                        "parity_skipped", "shards")},
               **cpu, "torch": torch.__version__, "workdir": str(work) if a.keep else None}
        print(json.dumps(row), flush=True)
        with open(a.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    print(f"\n{cpu['cpu']}, {cpu['nproc']} CPUs, flags {' '.join(cpu['cpu_flags']) or '-'}\n")
    print("| size (B) | params (B) | shard | peak RSS MB | seconds | probe err | parity | rc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["probe_max_rel_err"] is None else f"{r['probe_max_rel_err']:.2e}"
        parity = {0: "run", 1: "skipped"}.get(r["parity_skipped"], "-")
        print(f"| {r['size_b']} | {r['params_b']} | {r['shard']} | {r['peak_rss_mb']} | {r['seconds']} "
              f"| {err} | {parity} | {r['rc']} |")
    sys.exit(max(r["rc"] != 0 for r in rows))


if __name__ == "__main__":
    main()
