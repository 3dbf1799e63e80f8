"""CPU benchmark: export's GGUF conversion and quantization keep their *own* memory flat as the model grows.

    python bench/bench_convert.py --sizes 0.1,0.5,1.5

ru_maxrss (what export records as convert_peak_rss_mb, and what bench/gpu_pipeline.py records per stage)
counts the pages of the memory-mapped safetensors / GGUF input that the process has touched: file-backed
page cache, which the kernel drops under pressure, so it grows with the model without being a need. This
bench splits it: a poller reads /proc/<pid>/status (RssAnon: the process's own memory; RssFile: mapped file
pages) every 50 ms, and the child's own ru_maxrss (os.wait4), while llama.cpp's converter (kmed.ggufio.convert_cmd, export's exact command) and then
its quantizer (kmed.ggufio.quantize to q4_k_m, in a child process as export runs it) work on a random bf16
Llama (SmolLM2's architecture and tokenizer, which the converter knows) of each size
(bench/bench_merge.py's builder). One JSON row per size and step to --results, then a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from bench_merge import build_base, cpu_info, pick_shape  # noqa: E402
from gpu_pipeline import tree_rss_kb  # noqa: E402

from kmed.ggufio import convert_cmd  # noqa: E402

QUANT = ("import sys; from pathlib import Path; from kmed.ggufio import quantize; "
         "quantize(Path(sys.argv[1]), Path(sys.argv[2]), 'q4_k_m', 2)")


def watch(cmd: list[str]) -> dict[str, float]:
    """Run cmd; peak VmRSS / RssAnon / RssFile in MB, polled every 50 ms, and wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            _, _, anon, file = tree_rss_kb(proc.pid)  # the largest process's RssAnon, RssFile
            for k, v in (("VmRSS", anon + file), ("RssAnon", anon), ("RssFile", file)):
                peak[k] = max(peak[k], v)
            done.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: ru_maxrss as export records it
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    if proc.returncode != 0:
        last = err.strip().splitlines()[-1:] or [""]
        raise SystemExit(f"{Path(cmd[0]).name} exited with {proc.returncode}: {last[0][-160:]}")
    return {"wall_s": round(time.time() - t0, 1), "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_rss_mb": round(peak["VmRSS"] / 1024, 1),
            "peak_anon_mb": round(peak["RssAnon"] / 1024, 1), "peak_file_mb": round(peak["RssFile"] / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,0.5,1.5", help="billions of params, comma-separated")
    ap.add_argument("--results", default=str(ROOT / f"bench/results/convert-cpu-{datetime.date.today()}.jsonl"))
    ap.add_argument("--tmp", default=None, help="where the workdirs go (default: the system temp dir)")
    a = ap.parse_args()
    cpu, rows = cpu_info(), []
    for size_b in [float(s) for s in a.sizes.split(",")]:
        h, inter, heads, kv, layers = pick_shape(size_b)
        work = Path(tempfile.mkdtemp(prefix=f"bench-convert-{size_b}b-", dir=a.tmp))
        try:
            n = build_base(work / "base", h, inter, heads, kv, layers, llama=True)
            f16, q4 = work / "model-f16.gguf", work / "model-q4_k_m.gguf"
            for step, cmd, out in (("convert f16", convert_cmd(work / "base", f16), f16),
                                   ("quantize q4_k_m", [sys.executable, "-c", QUANT, str(f16), str(q4)], q4)):
                row = {"bench": "convert-cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "size_b": size_b, "params_b": round(n / 1e9, 4), "step": step, **watch(cmd),
                       "out_mb": round(out.stat().st_size / 2**20, 1), **cpu}
                print(json.dumps(row), flush=True)
                with open(a.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("| params | step | wall s | ru_maxrss MB | peak RSS MB (polled) | own (RssAnon) MB | mapped file (RssFile) MB "
          "| output MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['params_b']} B | {r['step']} | {r['wall_s']} | {r['ru_maxrss_mb']} | {r['peak_rss_mb']} | "
              f"{r['peak_anon_mb']} | {r['peak_file_mb']} | {r['out_mb']} |")


if __name__ == "__main__":
    main()
