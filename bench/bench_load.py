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
parameters. `--dtypes nf4` loads as `load_for_inference`'s 4-bit fallback and sft-stage2 do on the GPU
(bitsandbytes nf4, quantized on load; it runs on the CPU too): own memory is the 4-bit weights, the mapped shards
are the whole 16-bit checkpoint.

`--mem-limit-gib X` (root; cgroup v1 or v2) runs each load inside a fresh memory cgroup capped at X GiB: a host
with X GiB of RAM. The cgroup's limit counts the page cache of the mapped shards too, so a load that completes
under a cap smaller than the checkpoint shows that those pages are reclaimed as the load goes, not needed at once;
a cap under the load's own memory is killed (the row then says `completed: false`). One JSON row per size and
dtype is printed and appended to --results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_convert import watch  # noqa: E402
from bench_merge import build_base, cpu_info, pick_shape  # noqa: E402

# The child: the same from_pretrained arguments as kmed.modeling.load_for_inference on CUDA, on the CPU.
LOADER = """
import json, os, sys
if sys.argv[4]:  # join the memory cgroup before anything is loaded
    open(sys.argv[4], 'w').write(str(os.getpid()))
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
def rss():
    d = dict(l.split(':', 1) for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile')))
    return {k: int(v.split()[0]) for k, v in d.items()}
before = rss()
kw = {'dtype': getattr(torch, sys.argv[2])} if sys.argv[2] != 'nf4' else {'dtype': torch.bfloat16,
      'quantization_config': BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)}
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True, attn_implementation='sdpa',
                                         device_map={'': 'cpu'}, **kw)
after = rss()
params = sum(p.numel() * p.element_size() for p in m.parameters())
open(sys.argv[3], 'w').write(json.dumps({'before_kb': before, 'after_kb': after, 'param_bytes': params}))
"""


class Cgroup:
    """A fresh memory cgroup capped at `limit` bytes (v2 if the unified hierarchy is mounted, else v1)."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        self.dir = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / f"kmed-bench-load-{os.getpid()}"
        self.dir.mkdir()
        self.v2 = v2
        (self.dir / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if not v2:  # a v1 cgroup may otherwise push the excess to swap instead of reclaiming
            (self.dir / "memory.swappiness").write_text("0")
        self.procs = self.dir / "cgroup.procs"

    def stats(self) -> dict:
        if self.v2:
            ev = dict(ln.split() for ln in (self.dir / "memory.events").read_text().splitlines())
            return {"cgroup_peak_gib": round(int((self.dir / "memory.peak").read_text()) / 2**30, 3)
                    if (self.dir / "memory.peak").exists() else None,
                    "cgroup_hit_limit": int(ev.get("max", 0)), "cgroup_oom_kills": int(ev.get("oom_kill", 0))}
        read = lambda f: int((self.dir / f).read_text())  # noqa: E731
        return {"cgroup_peak_gib": round(read("memory.max_usage_in_bytes") / 2**30, 3),
                "cgroup_hit_limit": read("memory.failcnt")}

    def remove(self) -> None:
        self.dir.rmdir()


def evict(folder: Path) -> None:
    """Drop the shards from the page cache, so that every load reads them cold and the pages it maps are charged to
    its own cgroup (a page already cached stays charged to whoever read or wrote it first)."""
    os.sync()
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(folder: Path, dtype: str, limit_gib: float | None = None) -> dict:
    report = folder.parent / "loader.json"
    report.unlink(missing_ok=True)
    evict(folder)
    if not limit_gib:
        return load_row(folder, report, watch([sys.executable, "-c", LOADER, str(folder), dtype, str(report), ""]))
    cg = Cgroup(int(limit_gib * 2**30))
    try:
        w = watch([sys.executable, "-c", LOADER, str(folder), dtype, str(report), str(cg.procs)])
    except SystemExit as e:  # killed under the cap: what the row reports, not an error of the bench
        return {"mem_limit_gib": limit_gib, "completed": False, "error": str(e), **cg.stats()}
    else:
        return {**load_row(folder, report, w), "mem_limit_gib": limit_gib, "completed": True, **cg.stats()}
    finally:
        cg.remove()


def load_row(folder: Path, report: Path, w: dict) -> dict:
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
                    help="torch dtypes to load in: bfloat16 is the checkpoint's (no conversion), float16 forces a "
                         "copy, nf4 quantizes on load (bitsandbytes 4-bit, as on the GPU)")
    ap.add_argument("--mem-limit-gib", default="",
                    help="comma-separated caps (GiB): each load runs again in a memory cgroup at each cap (root)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/load-cpu.jsonl")
    a = ap.parse_args()
    rows = []
    for size in (float(s) for s in a.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="kmed-load-") as tmp:
            folder = Path(tmp) / "model"
            h, inter, heads, kv, layers = pick_shape(size)
            n = build_base(folder, h, inter, heads, kv, layers)
            limits = [None] + [float(x) for x in a.mem_limit_gib.split(",") if x]
            for dtype, limit in ((d, lim) for d in a.dtypes.split(",") for lim in limits):
                row = {"bench": "load-cpu", "size_b": round(n / 1e9, 3), "hidden": h, "layers": layers,
                       "dtype": dtype, **measure(folder, dtype, limit), **cpu_info(),
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
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    for r in (r for r in rows if r.get("mem_limit_gib")):
        print(f"{r['size_b']} B {r['dtype']} under a {r['mem_limit_gib']} GiB cap: completed {r['completed']}, "
              f"cgroup peak {r.get('cgroup_peak_gib')} GiB, hit the cap {r.get('cgroup_hit_limit')} times")
    print("CPU flags:", " ".join(rows[-1]["cpu_flags"]) if rows else "")


if __name__ == "__main__":
    main()
