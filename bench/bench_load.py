"""CPU benchmark: what loading a 16-bit checkpoint through transformers costs the host, own memory vs file pages.

    python bench/bench_load.py --sizes 0.5,1.5,3

The open question of issue 16 is the host RAM of sft-stage2, evaluate and export at 32B: on the H200 their peak
RSS was about the checkpoint's size (15 GiB at 7B). transformers 5 opens every safetensors shard with a memory map
and keeps all of them open until the load ends (`modeling_utils`, `all_pointer`), so that RSS may be file pages
the kernel can drop, not memory the stage needs. This measures the split on the CPU, for the loader call of
`kmed.modeling.load_for_inference` with `device_map={"": "cpu"}` instead of the GPU, in bf16 (the checkpoint's
dtype, or another with --dtypes): a child process loads a random-weight Qwen2 (bench_merge.build_base, ~0.5 GB shards) while this process
polls its RssAnon and RssFile every 50 ms (bench_convert.watch). On the CPU the weights stay in host memory, so the row also reports
the bytes of the loaded parameters and what the load needed beyond them; on a GPU those parameter bytes go to
the card. Loading in bf16 (the checkpoint's dtype) the CPU keeps the mapped pages as the weights (no copy);
`--dtypes float16` forces a copy of every tensor, which shows the loader's own transient memory beyond the
parameters. One JSON row per size and dtype is printed and appended to --results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_convert import watch  # noqa: E402
from bench_merge import build_base, cpu_info, pick_shape  # noqa: E402

# The child: the same from_pretrained arguments as kmed.modeling.load_for_inference on CUDA, on the CPU.
LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
def rss():
    d = dict(l.split(':', 1) for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile')))
    return {k: int(v.split()[0]) for k, v in d.items()}
before = rss()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]), use_safetensors=True,
                                         attn_implementation='sdpa', device_map={'': 'cpu'})
after = rss()
params = sum(p.numel() * p.element_size() for p in m.parameters())
open(sys.argv[3], 'w').write(json.dumps({'before_kb': before, 'after_kb': after, 'param_bytes': params}))
"""


def measure(folder: Path, dtype: str) -> dict:
    report = folder.parent / "loader.json"
    w = watch([sys.executable, "-c", LOADER, str(folder), dtype, str(report)])  # polls every 50 ms
    child = json.loads(report.read_text())
    gib, mb = 2**30, 2**20
    base_anon = child["before_kb"]["RssAnon"] * 1024
    return {
        "load_seconds": w["wall_s"],
        "checkpoint_gib": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / gib, 3),
        "param_gib": round(child["param_bytes"] / gib, 3),
        "anon_before_load_gib": round(base_anon / gib, 3),
        "file_before_load_gib": round(child["before_kb"]["RssFile"] / 2**20, 3),
        "peak_anon_gib": round(w["peak_anon_mb"] * mb / gib, 3),
        "peak_file_gib": round(w["peak_file_mb"] * mb / gib, 3),
        "peak_rss_gib": round(w["peak_rss_mb"] * mb / gib, 3),
        "anon_after_load_gib": round(child["after_kb"]["RssAnon"] * 1024 / gib, 3),
        "file_after_load_gib": round(child["after_kb"]["RssFile"] * 1024 / gib, 3),
        # own memory the load needed beyond the interpreter and the loaded parameters
        "load_overhead_anon_gib": round((w["peak_anon_mb"] * mb - base_anon - child["param_bytes"]) / gib, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,1.5,3", help="billions of params, comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float16",
                    help="torch dtypes to load in: bfloat16 is the checkpoint's (no conversion), float16 forces a copy")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/load-cpu.jsonl")
    a = ap.parse_args()
    rows = []
    for size in (float(s) for s in a.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="kmed-load-") as tmp:
            folder = Path(tmp) / "model"
            h, inter, heads, kv, layers = pick_shape(size)
            n = build_base(folder, h, inter, heads, kv, layers)
            for dtype in a.dtypes.split(","):
                row = {"bench": "load-cpu", "size_b": round(n / 1e9, 3), "hidden": h, "layers": layers,
                       "dtype": dtype, **measure(folder, dtype), **cpu_info(),
                       "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
                print(json.dumps(row), flush=True)
                a.results.parent.mkdir(parents=True, exist_ok=True)
                with a.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    cols = ["size_b", "dtype", "checkpoint_gib", "param_gib", "anon_before_load_gib", "peak_anon_gib",
            "file_before_load_gib", "peak_file_gib",
            "load_overhead_anon_gib", "file_after_load_gib", "load_seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print("CPU flags:", " ".join(rows[-1]["cpu_flags"]) if rows else "")


if __name__ == "__main__":
    main()
