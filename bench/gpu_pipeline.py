"""The recipe's stages at real size: sft-stage1 -> merge@stage1 -> sft-stage2 -> merge@stage2 -> evaluate ->
export, each the project's own stage command, on a random-weight model with a real architecture's shapes.

    python bench/gpu_pipeline.py pack --out .gpu_carry                                # here, on the CPU
    python bench/gpu_pipeline.py prepare --shape 7b --work /tmp/pipe --assets .gpu_carry --steps 10 --lr 1e-3 \
        [--stage2-init continue_adapter]
    python bench/gpu_pipeline.py stages --work /tmp/pipe --results $OUT/pipeline.jsonl            # all six
    python bench/gpu_pipeline.py stages --work /tmp/pipe --only merge@stage1 --results ...      # one
    python bench/gpu_pipeline.py table --results pipeline.jsonl

`pack` builds `--assets` from a clean checkout with the project's venv: llama-cpp-python's sdist (the installed
version, through pip), slimmed for the CUDA build; the Qwen2 tokenizer rebuilt from that sdist's
vendor/llama.cpp/models/ggml-vocab-qwen2.gguf with eos `<|im_end|>` and pad/bos `<|endoftext|>` (Qwen2.5-Instruct's
and R1-Distill-Qwen's ids; a pad equal to eos would be replaced by Unsloth's own pad token), ids.json with those
ids; processed/ = the repo's params.yaml run through prepare-base and preprocess in a temporary workdir.

`prepare` builds the base as a pre-quantized bitsandbytes NF4 checkpoint, layer by layer (bench/build_4bit.py:
the form of the seed's `unsloth/DeepSeek-R1-Distill-Qwen-32B-unsloth-bnb-4bit`, so merge takes its dequantize
path), swaps in the Qwen2 tokenizer from `--assets` (rebuilt by kmed.modeling.tokenizer_from_gguf from llama.cpp's
own models/ggml-vocab-qwen2.gguf: the real 151,936-token vocabulary and pre-tokenizer, which llama.cpp's converter
recognizes; eos `<|im_end|>`), copies `--assets/processed` to data/processed (the repo's preprocess
output: short records, so sequence lengths are the data's, not 2048) and writes params.yaml = the production
recipe with the bench's overrides (steps, evaluate sizes, export checks that do not gate: a random-weight
model has no meaningful greedy agreement and never says EOS).

`stages` runs each stage as `python -m stages.<module> ...` in the workdir with PYTHONPATH at the repo root,
through a wrapper process, and records per stage: wall seconds, peak RSS of the stage's process tree
(RUSAGE_CHILDREN of the wrapper), peak GPU memory in use (nvidia-smi, polled every 0.2 s), bytes its outputs
add on disk, the stage's own metrics, and the exit code. One JSON row per stage. The peak RSS is split too (polled
every 0.2 s): Pss_Anon, the processes' own memory, and Pss_File, pages of mapped files (safetensors, GGUF,
libraries) that ru_maxrss counts although the kernel can drop them, each summed over the process tree (Pss, so
that pages a forked worker shares with its parent count once); and the largest single process's RssAnon / RssFile.

Only the standard library at module level (the stages import torch themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES: dict[str, tuple[list[str], list[str], str]] = {  # name: (command, outputs, metrics file)
    "sft-stage1": (["-m", "stages.sft", "stage1"], ["models/stage1/adapter", "models/checkpoints/stage1"],
                   "metrics/sft-stage1.json"),
    "merge@stage1": (["-m", "stages.merge", "stage1"], ["models/stage1/merged"], "metrics/merge-stage1.json"),
    "sft-stage2": (["-m", "stages.sft", "stage2"], ["models/stage2/adapter", "models/checkpoints/stage2"],
                   "metrics/sft-stage2.json"),
    "merge@stage2": (["-m", "stages.merge", "stage2"], ["models/stage2/merged"], "metrics/merge-stage2.json"),
    "evaluate": (["-m", "stages.evaluate"], ["reports"], "metrics/eval.json"),
    "export": (["-m", "stages.export"], ["models/export"], "metrics/export.json"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WRAP = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print('KMED_BENCH ' + json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def du(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_blocks * 512
        elif p.is_dir():
            total += sum(f.stat().st_blocks * 512 for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return total


def cmd_prepare(a: argparse.Namespace) -> None:
    import yaml

    sys.path.insert(0, str(ROOT / "bench"))
    from build_4bit import RMS_NORM_EPS, SHAPES, build

    work, assets = Path(a.work), Path(a.assets)
    base = work / "models/base"
    if base.exists():
        shutil.rmtree(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ntok = len(json.loads((assets / "tokenizer.json").read_text())["model"]["vocab"])
    shape = dict(SHAPES[a.shape], vocab_size=max(SHAPES[a.shape].get("vocab_size") or 0, ntok))
    res = build(shape, base, rms_norm_eps=RMS_NORM_EPS.get(a.shape, 1e-6), form=a.base_form)
    for f in TOKENIZER_FILES:
        shutil.copy(assets / f, base / f)
    tcfg = json.loads((assets / "tokenizer_config.json").read_text())
    ids = json.loads((assets / "ids.json").read_text())  # bos/eos/pad ids of the Qwen2 tokenizer (`pack`)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((base / name).read_text())
        cfg.update({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]})
        (base / name).write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copytree(assets / "processed", work / "data/processed", dirs_exist_ok=True)

    raw = yaml.safe_load((ROOT / "recipes/r1-32b-medical-ko.yaml").read_text())
    raw["model"].update(base="models/base", revision=None, max_seq_length=2048)
    raw["sft_stage1"]["max_steps"] = raw["sft_stage2"]["max_steps"] = a.steps
    # A learning rate from the first step: at the recipe's 2e-4 with 5 warm-up steps, 3 steps leave a stage-2 LoRA
    # delta below bf16's resolution of the merged weights, and stage 1 and stage 2 evaluate identically.
    raw["train"].update(learning_rate=a.lr, warmup_steps=0)
    if a.stage2_init:  # sft_stage2.init (kmed.config validates it)
        raw["sft_stage2"]["init"] = a.stage2_init
    if a.min_retained is not None:  # 0: stage 2 runs (and records stage1_retained) whatever its start kept
        raw["sft_stage2"]["min_stage1_retained"] = a.min_retained
    raw["evaluate"].update(mcq_limit=16, gen_limit=4, translation_limit=4, max_new_tokens=32)  # batch: the recipe's
    raw["export"].update(quantizations=["q4_k_m"], min_token_agreement={}, max_ppl_delta={}, parity_tokens=8,
                         check_texts=2, check_max_tokens=128, chat_must_stop=False,
                         min_chat_format_ok=0.0)
    raw["mlflow"]["enabled"] = False
    (work / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    print(json.dumps({"mode": "prepare", "shape": a.shape, "params": res["params"], "eos": tcfg.get("eos_token"),
                      "stage2_init": raw["sft_stage2"]["init"], "base_form": a.base_form,
                      "base_bytes": du([base]), "secs": round(time.time() - t0, 1)}), flush=True)


QWEN2_VOCAB = "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# What the CUDA build of llama-cpp-python never reads: git history, llama.cpp's test vocabularies, docs, media.
SLIM_DROP = (".git/", "vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/media/",
             "vendor/llama.cpp/.github/", "docs/")


def cmd_pack(a: argparse.Namespace) -> None:
    """The assets of a device call (`--out`), from a clean checkout: see the module docstring."""
    import tarfile
    import tempfile
    from importlib import metadata

    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        # llama-cpp-python's sdist, the version this venv built export with.
        ver = metadata.version("llama_cpp_python")
        sdist = Path(a.sdist) if a.sdist else None
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={ver}", "-d", str(tmp)], check=True)
            sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        top = sdist.name.removesuffix(".tar.gz")
        with tarfile.open(sdist) as src, tarfile.open(out / sdist.name, "w:gz") as dst:
            for m in src:
                rel = m.name.removeprefix(f"{top}/")
                if rel == QWEN2_VOCAB:
                    (tmp / "qwen2.gguf").write_bytes(src.extractfile(m).read())  # type: ignore[union-attr]
                if m.isdir() or not rel.startswith(SLIM_DROP):
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        # The Qwen2 tokenizer, with Qwen2.5-Instruct's special-token roles.
        from kmed.modeling import tokenizer_from_gguf

        tok = tokenizer_from_gguf(tmp / "qwen2.gguf", model_max_length=32768)
        tok.eos_token, tok.pad_token, tok.bos_token = "<|im_end|>", "<|endoftext|>", "<|endoftext|>"
        tok.chat_template = tok.chat_template or CHATML
        tok.save_pretrained(tmp / "tok")
        for f in TOKENIZER_FILES:
            shutil.copy(tmp / "tok" / f, out / f)
        ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
        (out / "ids.json").write_text(json.dumps(ids) + "\n")
        # processed/: the repo's own preprocess output (the embedded default's samples).
        wd = tmp / "wd"
        (wd / "data").mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", wd / "params.yaml")
        shutil.copytree(ROOT / "data/samples", wd / "data/samples")
        shutil.copytree(ROOT / "data/raw", wd / "data/raw")
        env = dict(os.environ, PYTHONPATH=str(ROOT), KMED_MLFLOW="0")
        for stage in ("prepare_base", "preprocess"):
            subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=wd, env=env, check=True)
        shutil.copytree(wd / "data/processed", out / "processed")
    sizes = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
    print(json.dumps({"mode": "pack", "out": str(out), "ids": ids, "llama_cpp_python": ver, "bytes": sizes,
                      "processed": sorted(str(f.relative_to(out)) for f in (out / "processed").rglob("*.jsonl"))}))


def cmd_set(a: argparse.Namespace) -> None:
    """Edit the workdir's params.yaml (values parsed as YAML), e.g. to start stage 2 again with another init."""
    import yaml

    path = Path(a.work) / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for pair in a.pairs:
        key, _, value = pair.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for k in parents:
            node = node[k]
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))


def cmd_adapter(a: argparse.Namespace) -> None:
    """A random LoRA adapter for models/<stage>/adapter in PEFT's layout (the recipe's r, alpha, targets), so
    that merge can run alone at a size where training first would cost device time."""
    import torch
    import yaml
    from safetensors.torch import save_file

    work = Path(a.work)
    cfg = json.loads((work / "models/base/config.json").read_text())
    lora = yaml.safe_load((work / "params.yaml").read_text())["lora"]
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = h // heads
    kv = cfg["num_key_value_heads"] * hd
    dims = {"q_proj": ("self_attn", h, h), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", h, h), "gate_proj": ("mlp", h, inter), "up_proj": ("mlp", h, inter),
            "down_proj": ("mlp", inter, h)}
    torch.manual_seed(0)
    r, tensors = lora["r"], {}
    for i in range(cfg["num_hidden_layers"]):
        for name in lora["target_modules"]:
            blk, din, dout = dims[name]
            pre = f"base_model.model.model.layers.{i}.{blk}.{name}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, din) * 0.01
            tensors[f"{pre}.lora_B.weight"] = torch.randn(dout, r) * 0.01
    out = work / f"models/{a.stage}/adapter"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora["lora_alpha"],
        "lora_dropout": 0.0, "target_modules": list(lora["target_modules"]), "bias": "none",
        "use_rslora": bool(lora.get("use_rslora", False)), "base_model_name_or_path": "models/base"}, indent=2))
    print(json.dumps({"mode": "adapter", "tensors": len(tensors), "bytes": du([out])}), flush=True)


def tree_rss_kb(root: int) -> tuple[int, int, int, int]:
    """Memory of the process tree under `root` in kB: (Pss_Anon, Pss_File) summed over the tree, and the largest
    single process's (RssAnon, RssFile). Anon is the processes' own memory; File the pages of mapped files
    (safetensors, GGUF, libraries) that ru_maxrss also counts and the kernel can drop. Pss, not Rss, for the sums:
    forked workers (datasets' Map with num_proc, compile pools) share their parent's pages copy-on-write, and a
    sum of Rss counts those pages once per process."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                kids.setdefault(int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    pss_anon = pss_file = top_anon = top_file = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            f = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                 if ln.startswith(("Pss_Anon:", "Pss_File:"))}
            r = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if ln.startswith(("RssAnon:", "RssFile:"))}
        except (OSError, IndexError, ValueError):
            f, r = {}, {}
        pss_anon += f.get("Pss_Anon", 0)
        pss_file += f.get("Pss_File", 0)
        if r.get("RssAnon", 0) + r.get("RssFile", 0) > top_anon + top_file:
            top_anon, top_file = r.get("RssAnon", 0), r.get("RssFile", 0)
        stack += kids.get(pid, [])
    return pss_anon, pss_file, top_anon, top_file


def gpu_used_mib() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return max(int(x) for x in out.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1


def run_stage(name: str, work: Path, shape: str) -> dict[str, Any]:
    cmd, outs, metrics_file = STAGES[name]
    out_paths = [work / o for o in outs]
    before = du(out_paths)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", KMED_MLFLOW="0",
               PYTHONUNBUFFERED="1")
    idle, peak, stop = gpu_used_mib(), [0, 0, 0, 0, 0], threading.Event()
    (work / "logs").mkdir(exist_ok=True)
    log_path = work / "logs" / f"{name}.log"  # written as the stage runs: a stage killed by a call's limit keeps its log
    logf = open(log_path, "w")  # closed once the stage has ended
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", WRAP, sys.executable, *cmd], cwd=work, env=env,
                            stdout=logf, stderr=subprocess.STDOUT, text=True)

    def poll() -> None:
        while not stop.is_set():
            mem = tree_rss_kb(proc.pid)
            peak[:] = [max(peak[0], gpu_used_mib()), *(max(a, b) for a, b in zip(peak[1:], mem, strict=True))]
            stop.wait(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    proc.wait()
    secs = time.time() - t0
    logf.close()
    stop.set()
    th.join()
    text = log_path.read_text(errors="replace")
    wrap = next((json.loads(line[len("KMED_BENCH "):]) for line in text.splitlines()
                 if line.startswith("KMED_BENCH ")), {"rc": proc.returncode, "maxrss_kb": 0})
    mpath = work / metrics_file
    metrics = json.loads(mpath.read_text()) if mpath.exists() and wrap["rc"] == 0 else {}
    row = {"mode": "pipeline", "shape": shape, "stage": name, "rc": wrap["rc"], "secs": round(secs, 1),
           "peak_rss_gib": round(wrap["maxrss_kb"] / 2**20, 2),
           "peak_anon_gib": round(peak[1] / 2**20, 2), "peak_file_gib": round(peak[2] / 2**20, 2),
           "top_proc_anon_gib": round(peak[3] / 2**20, 2), "top_proc_file_gib": round(peak[4] / 2**20, 2),
           "peak_gpu_gib": round((peak[0] - max(idle, 0)) / 1024, 2) if peak[0] > 0 else None,
           "disk_gib": round((du(out_paths) - before) / 2**30, 2), "metrics": metrics,
           "date": time.strftime("%Y-%m-%d"), "gpu": gpu_name()}
    if wrap["rc"] != 0:
        row["error_tail"] = text[-1500:]
    return row


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "none"


def cmd_stages(a: argparse.Namespace) -> None:
    work = Path(a.work)
    names = a.only.split(",") if a.only else list(STAGES)
    shape = json.loads((work / "models/base/config.json").read_text()).get("hidden_size")
    for name in names:
        row = run_stage(name, work, a.shape or str(shape))
        print(json.dumps({k: v for k, v in row.items() if k != "metrics"}), flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["rc"] != 0 and not a.keep_going:
            raise SystemExit(f"{name} failed (rc {row['rc']}); see {work}/logs/{name}.log")


def cmd_table(a: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    print("| shape | stage | rc | wall s | peak RSS GiB | peak GPU GiB | disk GiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("mode") == "pipeline":
            print(f"| {r['shape']} | {r['stage']} | {r['rc']} | {r['secs']} | {r['peak_rss_gib']} | "
                  f"{r['peak_gpu_gib']} | {r['disk_gib']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--shape", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--assets", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="train.learning_rate (warm-up 0)")
    p.add_argument("--stage2-init", default="",
                   help="sft_stage2.init in the workdir's params.yaml (default: the recipe's; kmed.config validates it)")
    p.add_argument("--base-form", choices=["nf4", "bf16"], default="nf4",
                   help="the base as a pre-quantized NF4 checkpoint (the seed's unsloth-bnb-4bit form) or in bf16")
    p.add_argument("--min-retained", type=float, default=None, help="sft_stage2.min_stage1_retained in the workdir")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("set", help="set params.yaml keys of a workdir: --work W sft_stage2.init=continue_adapter ...")
    p.add_argument("--work", required=True)
    p.add_argument("pairs", nargs="+")
    p.set_defaults(fn=cmd_set)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=".gpu_carry")
    p.add_argument("--sdist", default="", help="a llama-cpp-python sdist already downloaded (default: pip download)")
    p.set_defaults(fn=cmd_pack)
    p = sub.add_parser("adapter")
    p.add_argument("--work", required=True)
    p.add_argument("--stage", default="stage1")
    p.set_defaults(fn=cmd_adapter)
    p = sub.add_parser("stages")
    p.add_argument("--work", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--only", default="")
    p.add_argument("--shape", default="")
    p.add_argument("--keep-going", action="store_true")
    p.set_defaults(fn=cmd_stages)
    p = sub.add_parser("table")
    p.add_argument("--results", required=True)
    p.set_defaults(fn=cmd_table)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
