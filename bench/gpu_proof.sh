#!/usr/bin/env bash
# Issue 16's proof on the GPU machine (device tool), one phase per call so each fits its 10-minute limit.
# Everything lives under build/ (git-ignored), which the device keeps between calls while it is warm.
#   bash bench/gpu_proof.sh setup pipe7b  # wheels into build/site; llama-cpp-python built with CUDA (detached);
#                                        # random-weight Qwen2.5-7B (NF4 base): sft-stage1 .. merge@stage2
#   bash bench/gpu_proof.sh eval7b export7b  # evaluate (capped to 12 GB: merged models load nf4); export (f16 + q4_k_m GGUF, llama.cpp on the GPU)
#                                        # export7b without a pipe7b workdir: 7B base + random adapter + merge@stage1 as the source
#   LCP_BUILD=0 bash bench/gpu_proof.sh pipe7b  # no llama.cpp build beside the stages (export7b needs it)
#   bash bench/gpu_proof.sh merge14b   # Qwen2.5-14B: a random adapter, then merge@stage1 alone (memory flat in size)
#   bash bench/gpu_proof.sh eval32b    # Qwen2.5-32B NF4 base as all three models of evaluate, capped to 24 GB
# Carry [".whl", ".gpu_carry"] (.whl from ../shared/gpu/wheels.sh; .gpu_carry: the SmolLM2 tokenizer files,
# ids.json, processed/ = data/processed, and the slimmed llama_cpp_python sdist). Results: $OUT/*.jsonl, logs.
set -uo pipefail
B=$PWD/build
OUT=${OUT:-$B/out}
mkdir -p "$B" "$OUT"
export PYTHONPATH=$PWD:$B/site:$B/lcp HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
PY=python3
# The device is handed back after 30 s idle and a fresh one is bare: every call sets up what is missing.
if [ "${1:-}" != setup ] && [ ! -d "$B/site/trl" ]; then set -- setup "$@"; fi
stages() {  # work shape results stage...
  local work=$1 shape=$2 res=$3; shift 3
  for s in "$@"; do $PY bench/gpu_pipeline.py stages --work "$work" --shape "$shape" --only "$s" --results "$res" || return 1; done
}
for phase in "$@"; do
case "$phase" in
setup)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$B/site" .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  free -g | tee -a "$OUT/gpu.txt"; df -h "$B" | tee -a "$OUT/gpu.txt"; nproc | tee -a "$OUT/gpu.txt"
  [ "${LCP_BUILD:-1}" = 0 ] && { echo "llama-cpp-python build skipped (LCP_BUILD=0)"; continue; }
  rm -rf "$B/lcp-src" && mkdir -p "$B/lcp-src" && tar xzf .gpu_carry/llama_cpp_python-*.tar.gz -C "$B/lcp-src"
  (cd "$B"/lcp-src/llama_cpp_python-* && setsid nohup bash -c 't0=$(date +%s);
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install --no-build-isolation --no-deps --no-index --target '"$B/lcp"' . ; \
    echo "rc=$? secs=$(( $(date +%s) - t0 ))" > '"$B/lcp-build.rc" > "$B/lcp-build.log" 2>&1 < /dev/null &)
  echo "llama-cpp-python CUDA build started, detached"
  ;;
pipe7b)
  $PY bench/gpu_pipeline.py prepare --shape 7b --work "$B/p7" --assets .gpu_carry --steps 3 | tee -a "$OUT/pipe7b.jsonl"
  stages "$B/p7" 7b "$OUT/pipe7b.jsonl" sft-stage1 merge@stage1 sft-stage2 merge@stage2
  ;;
retok7b)  # a workdir prepared with older assets: swap in the current tokenizer and its ids
  $PY - "$B/p7" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
work, c = Path(sys.argv[1]), Path(".gpu_carry")
ids = json.loads((c / "ids.json").read_text())
for d in [work / "models/base", *work.glob("models/stage*/merged")]:
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(c / f, d / f)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((d / name).read_text())
        cfg.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        (d / name).write_text(json.dumps(cfg, indent=2) + "\n")
    print("retokenized", d)
PYEOF
  ;;
eval7b)
  KMED_GPU_MEM_GB=12 stages "$B/p7" 7b "$OUT/pipe7b.jsonl" evaluate   # 12 GB: the merged 7B (15 GB) loads as nf4
  ;;
export7b)
  if [ ! -e "$B/p7/models/stage2/merged/config.json" ]; then
    rm -rf "$B/p7" "$B/p14" "$B/p32"
    $PY bench/gpu_pipeline.py prepare --shape 7b --work "$B/p7" --assets .gpu_carry --steps 1 | tee -a "$OUT/export7b.jsonl"
    $PY bench/gpu_pipeline.py adapter --work "$B/p7" | tee -a "$OUT/export7b.jsonl"
    stages "$B/p7" 7b "$OUT/export7b.jsonl" merge@stage1
    mkdir -p "$B/p7/models/stage2" && ln -sfn ../stage1/merged "$B/p7/models/stage2/merged"
  fi
  for i in $(seq 120); do [ -f "$B/lcp-build.rc" ] || ! pgrep -f "no-build-isolation" > /dev/null && break; sleep 5; done; cat "$B/lcp-build.rc"; tail -5 "$B/lcp-build.log"
  cp "$B/lcp-build.log" "$OUT/" ; cat "$B/lcp-build.rc" > "$OUT/lcp-build.rc"
  $PY -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())" | tee "$OUT/lcp.txt"
  stages "$B/p7" 7b "$OUT/export7b.jsonl" export
  ;;
merge14b)  # merge alone: a random adapter (the recipe's r/alpha/targets) instead of a training run
  rm -rf "$B/p7/models/export" "$B/p7/models/stage1" "$B/p7/models/stage2"  # disk for the 14B run
  $PY bench/gpu_pipeline.py prepare --shape 14b --work "$B/p14" --assets .gpu_carry --steps 1 | tee -a "$OUT/merge14b.jsonl"
  $PY bench/gpu_pipeline.py adapter --work "$B/p14" | tee -a "$OUT/merge14b.jsonl"
  stages "$B/p14" 14b "$OUT/merge14b.jsonl" merge@stage1
  ;;
eval32b)
  rm -rf "$B/p7" "$B/p14"
  $PY bench/gpu_pipeline.py prepare --shape 32b --work "$B/p32" --assets .gpu_carry --steps 1 | tee -a "$OUT/eval32b.jsonl"
  mkdir -p "$B/p32/models/stage1" "$B/p32/models/stage2"
  ln -sfn ../base "$B/p32/models/stage1/merged"; ln -sfn ../base "$B/p32/models/stage2/merged"
  KMED_GPU_MEM_GB=24 stages "$B/p32" 32b "$OUT/eval32b.jsonl" evaluate
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
done
for f in "$B"/p*/logs/*.log; do [ -f "$f" ] && n="$(basename "$(dirname "$(dirname "$f")")")-$(basename "$f")"; cp "$f" "$OUT/${n//@/_}"; done
exit 0
