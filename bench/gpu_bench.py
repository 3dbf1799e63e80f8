"""GPU truth and speed: run the project's own `python -m stages.sft stage1` on random-weight models with
the real architectures' shapes, and the reference raw loop (raw_loop.py) on the same card.

    python bench/gpu_bench.py build --shape 7b --out /tmp/models/7b          # random bf16 model + tokenizer
    python bench/gpu_bench.py stage --shape 7b --model /tmp/models/7b --backend unsloth \
        --packing padding_free --lengths realistic --steps 30 --results rows.jsonl [--reload]
    python bench/gpu_bench.py ref --shape 7b --model /tmp/models/7b --mode unsloth --raw-loop .whl/raw_loop.py \
        --results rows.jsonl
    python bench/gpu_bench.py suite --plan gpu-1.5b --out $OUT --budget-s 500   # a named list of the above
    python bench/gpu_bench.py table --results rows.jsonl                       # markdown table

`stage` prepares a temporary workdir (models/base -> the built model, data/processed/stage1/{train,val}.jsonl
with synthetic prompt/completion records, params.yaml = the repo's with the bench's overrides) and runs the
stage there with PYTHONPATH at the repo root. By default through a thin probe (`_probe`) that runs the
unmodified stage module with runpy and only adds an observer callback: per-step wall time (CUDA synchronized)
and real (non-pad) tokens counted at the model's forward, so steady-state tokens/s is exact also for
variable-length batches. `--no-probe` runs `python -m stages.sft stage1` literally (the stage's own
metrics/sft-stage1-curve.tsv is then used for the steady state).

Throughput = real tokens / s over the steps after warm-up (compile and first-shape steps excluded).
4N-MFU = 4 x non-embedding params x tokens/s / card's dense bf16 peak (989e12 for H100 SXM and H200): the
forward (2N) and the activation-gradient half of the backward (2N) of a frozen base; LoRA and
checkpoint recompute are not counted.

Only the standard library is imported at module level: the stage must import unsloth before transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATE = time.strftime("%Y-%m-%d")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}

# Qwen2.5 / DeepSeek-R1-Distill-Qwen shapes (the same table as the reference raw_loop.py).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
BOS, EOS = "<|begin_of_sentence|>", "<|endoftext|>"


def non_embedding_params(shape: dict[str, Any]) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return n * per_layer + h


# ---------------------------------------------------------------------------------------------
# build: random-weight model + byte-level tokenizer
# ---------------------------------------------------------------------------------------------
def make_tokenizer(out: Path) -> Any:
    """Byte-level BPE without merges: every byte of ASCII text is one token, so record lengths are exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                  model_max_length=32768, clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    return tok


def cmd_build(a: argparse.Namespace) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg.dtype = "bfloat16"
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy first: a 14B fp32 model would not fit an 80 GB card
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    del model
    make_tokenizer(out)
    print(json.dumps({"mode": "build", "shape": a.shape, "params": n, "device": dev,
                      "secs": round(time.time() - t0, 1)}), flush=True)


# ---------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------
WORDS = ("patient presents with acute chest pain fever cough dyspnea hypotension tachycardia troponin "
         "infarction ventricle preload nitrates fluids reperfusion diagnosis likely because therefore however "
         "consider differential history examination laboratory imaging pulse qi blood yin yang spleen "
         "kidney liver deficiency stagnation decoction herb acupuncture meridian tongue").split()


def text_of(rng: random.Random, n: int) -> str:
    """ASCII text of exactly n characters (= n tokens under the byte-level tokenizer)."""
    parts: list[str] = []
    size = 0
    while size < n + 1:  # joined length is size - 1
        w = rng.choice(WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:n]


def lengths_for(kind: str, n: int, seq: int, rng: random.Random) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens incl. EOS) per record.

    fixed: exactly seq tokens (compare with raw_loop's full rows). realistic: medical-reasoning records
    (question + R1 chain of thought + answer): log-normal total, median 900, clipped to [200, seq];
    the prompt is 10-30 % of it."""
    out = []
    for _ in range(n):
        if kind == "fixed":
            total = seq
            p = seq // 4
        else:
            total = int(min(seq, max(200, rng.lognormvariate(math.log(900), 0.5))))
            p = max(32, int(total * rng.uniform(0.10, 0.30)))
        out.append((p, total - p))
    return out


def write_data(wd: Path, kind: str, n_train: int, seq: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    d = wd / "data/processed/stage1"
    d.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, n in (("train", n_train), ("val", 4)):
        lens = lengths_for(kind if split == "train" else "realistic", n, min(seq, 1024) if split == "val" else seq,
                           rng)
        rows = [{"prompt": text_of(rng, p), "completion": text_of(rng, c - 1) + EOS} for p, c in lens]
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tot = [p + c for p, c in lens]
        stats[split] = {"rows": n, "mean_tokens": round(sum(tot) / n, 1), "max_tokens": max(tot),
                        "min_tokens": min(tot)}
    return stats


def params_optim() -> str:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]["optim"]


def write_params(wd: Path, a: argparse.Namespace) -> None:
    import yaml

    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p["model"].update(backend=a.backend, max_seq_length=a.seq, load_in_4bit=True)
    p["train"].update(max_steps=a.steps, save_steps=100000, packing=a.packing, per_device_train_batch_size=a.bs,
                      gradient_accumulation_steps=1, logging_steps=max(1, a.steps // 4))
    if getattr(a, "optim", None):  # e.g. the production recipe's adamw_8bit (recipes/r1-32b-medical-ko.yaml)
        p["train"]["optim"] = a.optim
    gc = getattr(a, "gc", "unsloth")
    p["lora"]["use_gradient_checkpointing"] = {"true": True, "false": False}.get(gc, gc)
    p.setdefault("sft_stage1", {})["max_steps"] = None
    p.setdefault("mlflow", {})["enabled"] = False
    (wd / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False, allow_unicode=True), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# _probe: the unmodified stage module plus an observer callback
# ---------------------------------------------------------------------------------------------
def cmd_probe(a: argparse.Namespace) -> None:
    import runpy

    if os.environ.get("BENCH_BACKEND") == "unsloth":
        import unsloth  # noqa: F401  (the stage does this first too; the probe must not import transformers before)
    import torch
    import transformers

    out_path = os.environ["BENCH_PROBE_OUT"]
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class StepClock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.real: list[Any] = []
            self.computed = 0
            self.hook = None
            self.pre_peak = 0.0

        def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or not module.training:
                return
            m = kwargs.get("attention_mask")
            self.real.append(m.sum() if m is not None and m.dim() == 2 else ids.numel())
            self.computed += ids.numel()

        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
            if cuda:
                self.pre_peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            # The decoder stack (Qwen2Model) runs once per micro-batch on every path: TRL's loss, the stage's
            # selective-head loss (which bypasses the PEFT wrapper) and Unsloth's fast forward.
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            inner = getattr(inner, "model", inner)
            self.hook = inner.register_forward_pre_hook(self._count, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.t0, self.real, self.computed = time.perf_counter(), [], 0

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            dt = time.perf_counter() - self.t0
            real = int(sum(int(x) for x in self.real))
            self.rows.append({"step": state.global_step, "dt": dt, "tokens": real, "computed": self.computed,
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0})

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.hook is not None:
                self.hook.remove()
            with open(out_path, "w") as f:
                json.dump({"pre_train_peak_gib": self.pre_peak, "steps": self.rows}, f)

    orig_add = transformers.Trainer.add_callback

    def add_callback(self: Any, cb: Any) -> None:
        orig_add(self, cb)
        if not getattr(self, "_bench_probe", False):
            self._bench_probe = True
            orig_add(self, StepClock())

    transformers.Trainer.add_callback = add_callback
    sys.argv = ["stages.sft", "stage1"]
    runpy.run_module("stages.sft", run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------------------------------------
# stage: one measurement of the project's stage
# ---------------------------------------------------------------------------------------------
def env_for(backend: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    pp = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(pp), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               UNSLOTH_DISABLE_STATISTICS="1", PYTHONUNBUFFERED="1", BENCH_BACKEND=backend,
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
    env.update(extra or {})
    return env


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ (cd {cwd}; {' '.join(cmd)})\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def visible_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return 0
    n = len([x for x in out.splitlines() if x.startswith("GPU ")])
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return min(n, len(cvd.split(","))) if cvd else n


def card_name() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "cpu"
    return "H200" if "H200" in name else "H100" if "H100" in name else name


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def steady(steps: list[dict[str, Any]], warm: int) -> dict[str, Any]:
    rows = steps[warm:] if len(steps) > warm else steps[-1:]
    dt = sum(r["dt"] for r in rows)
    tok = sum(r["tokens"] for r in rows)
    return {"tok_s": tok / dt if dt > 0 else float("nan"), "step_s": statistics.median(r["dt"] for r in rows),
            "computed_tok_s": sum(r["computed"] for r in rows) / dt if dt > 0 else float("nan"),
            "steady_steps": len(rows)}


def curve_steady(curve: Path, warm: int) -> float | None:
    """Harmonic mean of the stage's own per-step tokens/s after warm-up (exact for fixed-length rows)."""
    try:
        lines = curve.read_text().splitlines()[1:]
    except OSError:
        return None
    tps = [float(line.split("\t")[4]) for line in lines][warm:]
    tps = [t for t in tps if t > 0]
    return len(tps) / sum(1 / t for t in tps) if tps else None


def append_row(path: str | None, row: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def cmd_stage(a: argparse.Namespace) -> dict[str, Any]:
    wd = Path(a.workdir or f"/tmp/gpu_bench/{a.shape}-{a.backend}-{a.packing}-{a.lengths}-{os.getpid()}")
    if wd.exists():
        shutil.rmtree(wd)
    (wd / "models").mkdir(parents=True)
    (wd / "metrics").mkdir()
    model_dir = Path(a.model).resolve()
    os.symlink(model_dir, wd / "models/base")
    data_stats = write_data(wd, a.lengths, a.steps * a.bs + 8, a.seq)
    write_params(wd, a)
    log = Path(a.log) if a.log else wd / "stage.log"
    probe_out = wd / "probe.json"
    launch = getattr(a, "launch", 1)
    if launch > 1:  # DDP, one process per GPU: what docs tell users with several GPUs to run
        a.no_probe = True
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(launch),
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "-m", "stages.sft", "stage1"]
    elif a.no_probe:
        cmd = [sys.executable, "-m", "stages.sft", "stage1"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_probe"]
    shown = f"python -m stages.sft stage1  # cwd {wd}" + ("" if a.no_probe else " (via gpu_bench.py _probe)")
    if launch > 1:
        shown = f"accelerate launch --multi_gpu --num_processes {launch} -m stages.sft stage1  # cwd {wd}"
    rc, wall = run_logged(cmd, wd, env_for(a.backend, {"BENCH_PROBE_OUT": str(probe_out)}), log, a.timeout)
    shape = SHAPES[a.shape]
    row: dict[str, Any] = {
        "kind": "stage", "card": card_name(), "shape": a.shape, "backend": a.backend, "packing": a.packing,
        "lengths": a.lengths, "seq": a.seq, "bs": a.bs, "steps_asked": a.steps, "rc": rc,
        "gc": getattr(a, "gc", "unsloth"), "optim": getattr(a, "optim", None) or params_optim(),
        "gpus": launch, "visible_gpus": visible_gpus(),
        "wall_s": round(wall, 1), "data": data_stats, "versions": versions(), "date": DATE,
        "non_embedding_params": non_embedding_params(shape), "command": shown, "workdir": str(wd),
    }
    metrics_path = wd / "metrics/sft-stage1.json"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        row.update(stage_metrics={k: m.get(k) for k in ("tokens_per_s", "tokens_per_s_steady", "peak_mem_gib", "peak_mem_reserved_gib", "train_seconds", "steps", "world_size",
                                                         "load_seconds", "train_loss_first", "train_loss_final",
                                                         "val_loss_start", "val_loss_final", "tokens_seen")})
    lineage = wd / "models/stage1/adapter/lineage.json"
    if lineage.exists():  # what train.packing resolved to (auto → padding-free / padded)
        row["batches"] = json.loads(lineage.read_text()).get("notes", {}).get("batches")
    warm = max(3, a.steps // 4)
    if probe_out.exists():
        pr = json.loads(probe_out.read_text())
        s = steady(pr["steps"], warm)
        row.update(tok_s=round(s["tok_s"], 1), step_s=round(s["step_s"], 4),
                   computed_tok_s=round(s["computed_tok_s"], 1), steady_steps=s["steady_steps"],
                   peak_gib=round(max((r["peak_gib"] for r in pr["steps"]), default=0.0), 2),
                   pre_train_peak_gib=round(pr["pre_train_peak_gib"], 2),
                   first_steps_s=[round(r["dt"], 2) for r in pr["steps"][:warm]])
    cs = curve_steady(wd / "metrics/sft-stage1-curve.tsv", warm)
    if cs is not None:
        row["curve_tok_s"] = round(cs, 1)
        row.setdefault("tok_s", row["curve_tok_s"])
    if a.no_probe and (row.get("stage_metrics") or {}).get("tokens_per_s_steady"):
        row["tok_s"] = round(row["stage_metrics"]["tokens_per_s_steady"], 1)  # the stage's own window clock
    if "peak_gib" not in row and "stage_metrics" in row:
        row["peak_gib"] = row["stage_metrics"].get("peak_mem_gib")
    card = row["card"]
    if isinstance(row.get("tok_s"), float) and card in PEAK_FLOPS:
        row["mfu_4n"] = round(4 * row["non_embedding_params"] * row["tok_s"] / PEAK_FLOPS[card], 4)
    losses = []
    try:
        losses = [float(x.split("\t")[1]) for x in (wd / "metrics/sft-stage1-curve.tsv").read_text().splitlines()[1:]]
    except OSError:
        pass
    row["loss_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    adapter = wd / "models/stage1/adapter"
    row["adapter_saved"] = (adapter / "adapter_model.safetensors").exists()
    if row["adapter_saved"]:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        row["adapter_base_path"] = cfg.get("base_model_name_or_path")
    try:  # a one-process run on a several-GPU machine must say it trains on one GPU (stages/sft.py)
        row["one_gpu_warning"] = "GPUs visible to one process" in log.read_text(errors="replace")
    except OSError:
        pass
    if rc != 0:
        row["error"] = tail(log, 30)
    if a.reload and row["adapter_saved"]:
        modes = ["peft"] + (["unsloth"] if a.backend == "unsloth" else [])
        row["reload"] = {}
        for mode in modes:
            out = wd / f"reload-{mode}.json"
            rrc, rwall = run_logged([sys.executable, str(Path(__file__).resolve()), "_reload", "--mode", mode,
                                     "--workdir", str(wd), "--json", str(out)], wd, env_for(mode), log,
                                    a.timeout)
            res = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": tail(log, 15)}
            res.update(rc=rrc, wall_s=round(rwall, 1))
            row["reload"][mode] = res
    append_row(a.results, row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("error", "data", "versions")}), flush=True)
    if rc != 0:
        print(row.get("error", ""), flush=True)
    if a.keep_going is False and rc != 0:
        sys.exit(rc)
    shutil.rmtree(wd / "models/checkpoints", ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------
# _reload: load the saved adapter onto the base and run a forward
# ---------------------------------------------------------------------------------------------
def cmd_reload(a: argparse.Namespace) -> None:
    wd = Path(a.workdir)
    adapter = wd / "models/stage1/adapter"
    res: dict[str, Any] = {"mode": a.mode, "ok": False}
    t0 = time.time()
    try:
        if a.mode == "unsloth":
            import unsloth  # noqa: F401
            from unsloth import FastLanguageModel

            model, tok = FastLanguageModel.from_pretrained(model_name=str(adapter), max_seq_length=2048,
                                                           load_in_4bit=True, local_files_only=True)
            FastLanguageModel.for_inference(model)
        else:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kw: dict[str, Any] = {"dtype": torch.bfloat16}
            if torch.cuda.is_available():
                from transformers import BitsAndBytesConfig

                kw.update(quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0})
            base = AutoModelForCausalLM.from_pretrained(str(wd / "models/base"), **kw)
            model = PeftModel.from_pretrained(base, str(adapter))
            tok = AutoTokenizer.from_pretrained(str(adapter))
            model.eval()
        import torch
        from safetensors.torch import load_file

        sd = load_file(str(adapter / "adapter_model.safetensors"))
        res["lora_tensors"] = len(sd)
        res["lora_B_abs_sum"] = float(sum(v.float().abs().sum() for k, v in sd.items() if "lora_B" in k))
        loaded_b = [p.detach() for n, p in model.named_parameters() if "lora_B" in n]
        res["loaded_lora_B_abs_sum"] = float(sum(p.float().abs().sum() for p in loaded_b))
        dev = next(model.parameters()).device
        ids = tok("patient presents with fever and cough; think step by step", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev)).logits
        res.update(logits_shape=list(logits.shape), logits_finite=bool(torch.isfinite(logits).all()))
        res["ok"] = res["logits_finite"] and res["lora_B_abs_sum"] > 0 and res["loaded_lora_B_abs_sum"] > 0
    except Exception as e:  # report, don't crash the suite
        import traceback

        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    res["secs"] = round(time.time() - t0, 1)
    Path(a.json).write_text(json.dumps(res))
    print(json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# ref: the reference raw loop on the same card
# ---------------------------------------------------------------------------------------------
def cmd_ref(a: argparse.Namespace) -> dict[str, Any]:
    log = Path(a.log) if a.log else Path(f"/tmp/ref-{a.shape}-{a.mode}.log")
    cmd = [sys.executable, str(Path(a.raw_loop).resolve()), a.mode, "--model", str(Path(a.model).resolve()),
           "--steps", str(a.steps), "--bs", str(a.bs), "--seq", str(a.seq)]
    rc, wall = run_logged(cmd, Path.cwd(), env_for(a.mode), log, a.timeout)
    row: dict[str, Any] = {"kind": "ref", "card": card_name(), "shape": a.shape, "backend": a.mode, "seq": a.seq,
                           "bs": a.bs, "rc": rc, "wall_s": round(wall, 1), "date": DATE, "versions": versions(),
                           "non_embedding_params": non_embedding_params(SHAPES[a.shape]),
                           "command": " ".join(["python", "raw_loop.py"] + cmd[2:])}
    for line in reversed(tail(log, 60).splitlines()):
        if line.startswith("{") and '"tok_per_s"' in line:
            r = json.loads(line)
            row.update(tok_s=r["tok_per_s"], step_s=r["step_s"], peak_gib=r["peak_gib"], loss=r.get("loss"))
            break
    if isinstance(row.get("tok_s"), float) and row["card"] in PEAK_FLOPS:
        row["mfu_4n"] = round(4 * row["non_embedding_params"] * row["tok_s"] / PEAK_FLOPS[row["card"]], 4)
    if rc != 0:
        row["error"] = tail(log, 20)
    append_row(a.results, row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("error", "versions")}), flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ",.0f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    refs = {(r["card"], r["shape"], r["backend"]): r for r in rows if r["kind"] == "ref" and r.get("tok_s")}
    head = ("| card | shape | backend | packing | lengths | seq×bs | real tok/s | step s | peak GiB | 4N-MFU | "
            "ref raw_loop tok/s | ratio | loss ok | adapter | reload | rc |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ref = refs.get((r["card"], r["shape"], r["backend"])) if r["kind"] == "stage" else None
        ratio = r["tok_s"] / ref["tok_s"] if ref and r.get("tok_s") else None
        rl = r.get("reload")
        reload_s = " ".join(f"{k}:{'ok' if v.get('ok') else 'FAIL'}" for k, v in rl.items()) if rl else "—"
        out.append("| " + " | ".join([
            r["card"], r["shape"], r["backend"] + (" (raw_loop)" if r["kind"] == "ref" else ""),
            r.get("packing", "—(full rows)") if r["kind"] == "stage" else "— (full rows)",
            r.get("lengths", "fixed"), f"{r['seq']}×{r['bs']}", fmt(r.get("tok_s")), fmt(r.get("step_s"), ".3f"),
            fmt(r.get("peak_gib"), ".1f"), fmt(100 * r["mfu_4n"], ".1f") + "%" if r.get("mfu_4n") else "—",
            fmt(ref["tok_s"]) if ref else "—", fmt(ratio, ".2f") + "×" if ratio else "—",
            ("yes" if r.get("loss_finite") else "NO") if r["kind"] == "stage" else "—",
            ("yes" if r.get("adapter_saved") else "NO") if r["kind"] == "stage" else "—",
            reload_s, str(r["rc"]),
        ]) + " |")
    return "\n".join(out)


def cmd_table(a: argparse.Namespace) -> None:
    rows = [json.loads(x) for x in Path(a.results).read_text().splitlines() if x.strip()]
    print(table(rows))


# ---------------------------------------------------------------------------------------------
# suite: named plans for one device call, with a time budget
# ---------------------------------------------------------------------------------------------
def plan(name: str) -> list[tuple[str, dict[str, Any], float]]:
    """(job, args, estimated seconds). build jobs make /tmp/models/<shape>."""
    S = "stage"
    fixed = dict(packing="padding_free", lengths="fixed")
    if name == "tiny":
        return [("build", {"shape": "tiny"}, 20),
                (S, dict(shape="tiny", backend="hf", steps=2, bs=2, seq=256, reload=True, **fixed), 40)]
    if name == "gpu-1.5b":
        return [("build", {"shape": "1.5b"}, 40),
                (S, dict(shape="1.5b", backend="unsloth", steps=20, reload=True, **fixed), 150),
                ("ref", dict(shape="1.5b", mode="unsloth"), 60),
                (S, dict(shape="1.5b", backend="hf", steps=20, reload=True, **fixed), 90),
                ("ref", dict(shape="1.5b", mode="hf"), 50),
                (S, dict(shape="1.5b", backend="unsloth", steps=30, packing="padding_free", lengths="realistic"), 80),
                (S, dict(shape="1.5b", backend="unsloth", steps=30, packing="none", lengths="realistic"), 80)]
    if name == "gpu-7b":
        return [("build", {"shape": "7b"}, 70),
                (S, dict(shape="7b", backend="unsloth", steps=12, **fixed), 110),
                ("ref", dict(shape="7b", mode="unsloth", steps=12), 90),
                (S, dict(shape="7b", backend="hf", steps=8, **fixed), 80),
                (S, dict(shape="7b", backend="unsloth", steps=16, packing="none", lengths="realistic"), 85),
                (S, dict(shape="7b", backend="unsloth", steps=16, packing="padding_free", lengths="realistic"), 85),
                ("ref", dict(shape="7b", mode="hf", steps=8), 55),
                (S, dict(shape="7b", backend="unsloth", steps=12, packing="bfd", lengths="realistic"), 85)]
    if name == "gpu-verify":  # after the sync/packing fixes: the stage's own clock, no per-step probe
        nf = dict(no_probe=True, lengths="fixed", packing="none")
        return [("build", {"shape": "7b"}, 70),
                (S, dict(shape="7b", backend="unsloth", steps=40, **nf), 110),
                ("ref", dict(shape="7b", mode="unsloth", steps=12), 90),
                (S, dict(shape="7b", backend="unsloth", steps=40, no_probe=True, packing="bfd", lengths="realistic"),
                 110),
                ("build", {"shape": "1.5b"}, 40),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, **nf), 90),
                ("ref", dict(shape="1.5b", mode="unsloth"), 60)]
    if name == "gpu-14b":
        return [("build", {"shape": "14b"}, 120),
                (S, dict(shape="14b", backend="unsloth", steps=12, **fixed), 180),
                ("ref", dict(shape="14b", mode="unsloth"), 130),
                (S, dict(shape="14b", backend="unsloth", steps=16, packing="padding_free", lengths="realistic"),
                 150)]
    # Session 2 (2026-11-28): packed rows through torch's flash varlen (kmed.fastattn), checkpointing off
    # where the card has room, the 1.5B reference in the same call, 14B, 32B from a 4-bit build, DDP.
    pk = dict(no_probe=True, packing="bfd", lengths="realistic")
    nf = dict(no_probe=True, lengths="fixed", packing="none")
    if name == "gpu-pack":
        return [("build", {"shape": "7b"}, 70),
                ("ref", dict(shape="7b", mode="unsloth", steps=12), 90),
                (S, dict(shape="7b", backend="unsloth", steps=30, **pk), 100),
                (S, dict(shape="7b", backend="unsloth", steps=30, gc="false", **pk), 100),
                (S, dict(shape="7b", backend="unsloth", steps=30, gc="false", **nf), 100)]
    if name == "gpu-small":
        return [("build", {"shape": "1.5b"}, 40),
                ("ref", dict(shape="1.5b", mode="unsloth", steps=12), 60),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, **nf), 80),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, gc="false", **nf), 80),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, gc="false", **pk), 80)]
    if name == "gpu-14b-v2":
        return [("build", {"shape": "14b"}, 120),
                ("ref", dict(shape="14b", mode="unsloth", steps=10), 130),
                (S, dict(shape="14b", backend="unsloth", steps=20, **nf), 150),
                (S, dict(shape="14b", backend="unsloth", steps=20, gc="false", **pk), 150)]
    if name == "gpu-32b":
        return [("build", {"shape": "32b", "nf4": True}, 240),
                (S, dict(shape="32b", backend="unsloth", steps=8, **nf), 240),
                (S, dict(shape="32b", backend="unsloth", steps=8, no_probe=True, lengths="fixed", packing="none",
                         bs=1), 200)]
    if name == "gpu-32b-small":  # one call: the 32B memory rows first, then 1.5B against its reference
        return [("build", {"shape": "32b", "nf4": True}, 60),
                (S, dict(shape="32b", backend="unsloth", steps=6, **nf), 130),
                (S, dict(shape="32b", backend="unsloth", steps=6, bs=1, **nf), 110),
                ("build", {"shape": "1.5b"}, 40),
                ("ref", dict(shape="1.5b", mode="unsloth", steps=12), 60),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, **nf), 70),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, gc="false", **nf), 70)]
    if name == "gpu-small-nogc":  # 1.5B: checkpointing off against the reference, same call
        return [("build", {"shape": "1.5b"}, 40),
                ("ref", dict(shape="1.5b", mode="unsloth", steps=12), 60),
                (S, dict(shape="1.5b", backend="unsloth", steps=40, gc="false", **nf), 70)]
    if name == "gpu-ddp":  # on a 2-GPU kind; the one-process rows see both GPUs (the stage must use one)
        return [("build", {"shape": "1.5b"}, 40),
                (S, dict(shape="1.5b", backend="hf", steps=30, **nf), 90),
                (S, dict(shape="1.5b", backend="hf", steps=30, launch=2, **nf), 120),
                (S, dict(shape="1.5b", backend="unsloth", steps=30, **nf), 90),
                (S, dict(shape="1.5b", backend="unsloth", steps=30, launch=2, **nf), 150)]
    # Session 4: the 32B rows with the production recipe's optimizer (adamw_8bit; the earlier 32B rows ran
    # params.yaml's adamw_torch), and 14B packed at batch 2 on a host of its own.
    if name == "gpu-32b-recipe":
        return [("build", {"shape": "32b", "nf4": True}, 60),
                (S, dict(shape="32b", backend="unsloth", steps=6, optim="adamw_8bit", **nf), 130),
                (S, dict(shape="32b", backend="unsloth", steps=8, optim="adamw_8bit", no_probe=True, packing="none",
                         lengths="realistic"), 130),
                (S, dict(shape="32b", backend="unsloth", steps=6, optim="paged_adamw_8bit", **nf), 130)]
    if name == "gpu-32b-pf":  # the recipe on realistic lengths: padded (auto today) vs padding-free with kmed.fastattn
        rl = dict(no_probe=True, lengths="realistic", optim="adamw_8bit")
        return [("build", {"shape": "32b", "nf4": True}, 60),
                (S, dict(shape="32b", backend="unsloth", steps=24, packing="padding_free", **rl), 100),
                (S, dict(shape="32b", backend="unsloth", steps=24, packing="none", **rl), 130)]
    if name == "gpu-14b-pack2":
        return [("build", {"shape": "14b"}, 120),
                ("ref", dict(shape="14b", mode="unsloth", steps=10), 130),
                (S, dict(shape="14b", backend="unsloth", steps=20, gc="false", **pk), 150),
                (S, dict(shape="14b", backend="unsloth", steps=20, gc="false", optim="adamw_8bit", **pk), 150)]
    if name == "gpu-7b-auto":  # session 5: the shipped default (train.packing auto) at 7B on realistic lengths
        au = dict(no_probe=True, lengths="realistic", packing="auto")
        return [("build", {"shape": "7b"}, 90),
                ("ref", dict(shape="7b", mode="unsloth", steps=12), 90),
                (S, dict(shape="7b", backend="unsloth", steps=32, **au), 110),
                (S, dict(shape="7b", backend="unsloth", steps=32, gc="false", **au), 110),
                (S, dict(shape="7b", backend="unsloth", steps=32, gc="false", **pk), 110)]
    if name == "gpu-7b-auto-vs-padded":  # does auto's padding-free choice hold at 7B (measured at 32B, call O)?
        rl = dict(no_probe=True, lengths="realistic")
        return [("build", {"shape": "7b"}, 90),
                (S, dict(shape="7b", backend="unsloth", steps=32, packing="auto", **rl), 110),
                (S, dict(shape="7b", backend="unsloth", steps=32, packing="none", **rl), 160)]
    raise SystemExit(f"unknown plan {name!r}")


def cmd_suite(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = str(out / "rows.jsonl")
    log = out / "jobs.log"
    t_end = time.time() + a.budget_s
    models = Path(a.model_root)
    raw_loop = a.raw_loop or str(ROOT / ".whl/raw_loop.py")
    jobs = [j for name in a.plan.split(",") for j in plan(name)]
    if a.only:
        keep = set(a.only.split(","))
        jobs = [j for i, j in enumerate(jobs) if str(i) in keep or j[0] == "build"]
    for i, (job, kw, est) in enumerate(jobs):
        left = t_end - time.time()
        if left < est and job != "build":
            print(f"[suite] skip job {i} {job} {kw}: {left:.0f}s left < est {est:.0f}s", flush=True)
            append_row(results, {"kind": "skipped", "job": job, **kw, "left_s": round(left)})
            continue
        print(f"[suite] job {i} {job} {kw} ({left:.0f}s left)", flush=True)
        t0 = time.time()
        if job == "build":
            mdir = models / kw["shape"]
            for other in models.glob("*"):  # the disk holds one big model at a time
                if other != mdir:
                    shutil.rmtree(other, ignore_errors=True)
            if not (mdir / "config.json").exists():
                builder = ([str(ROOT / "bench/build_4bit.py")] if kw.get("nf4")  # 32B: 4-bit, layer by layer
                           else [str(Path(__file__).resolve()), "build"])
                rc, _ = run_logged([sys.executable, *builder, "--shape", kw["shape"], "--out", str(mdir)], ROOT,
                                   env_for("hf"), log, max(left, 60))
                if rc != 0:
                    print(tail(log, 20), flush=True)
        else:
            ns = argparse.Namespace(
                shape=kw["shape"], model=str(models / kw["shape"]), results=results, log=str(out / f"job{i}.log"),
                timeout=max(30.0, min(left - 5, 3 * est)), seq=kw.get("seq", 2048), bs=kw.get("bs", 2),
                steps=kw.get("steps", 10), keep_going=True)
            if job == "stage":
                ns.__dict__.update(backend=kw["backend"], packing=kw["packing"], lengths=kw["lengths"],
                                   reload=kw.get("reload", False), no_probe=kw.get("no_probe", False),
                                   gc=kw.get("gc", "unsloth"), launch=kw.get("launch", 1), optim=kw.get("optim"),
                                   workdir=str(Path(a.work_root) / f"job{i}"))
                cmd_stage(ns)
            else:
                ns.__dict__.update(mode=kw["mode"], raw_loop=raw_loop)
                cmd_ref(ns)
        print(f"[suite] job {i} took {time.time() - t0:.0f}s", flush=True)
    rows = [json.loads(x) for x in Path(results).read_text().splitlines() if x.strip()] if Path(results).exists() else []
    print(table([r for r in rows if r["kind"] != "skipped"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=list(SHAPES), required=True)
    b.add_argument("--out", required=True)
    for name in ("stage", "ref"):
        s = sub.add_parser(name)
        s.add_argument("--shape", choices=list(SHAPES), required=True)
        s.add_argument("--model", required=True)
        s.add_argument("--steps", type=int, default=20)
        s.add_argument("--bs", type=int, default=2)
        s.add_argument("--seq", type=int, default=2048)
        s.add_argument("--results")
        s.add_argument("--log")
        s.add_argument("--timeout", type=float, default=1800)
        s.add_argument("--keep-going", action="store_true")
    st = sub.choices["stage"]
    st.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth")
    st.add_argument("--packing", choices=["padding_free", "bfd", "none", "auto"], default="padding_free")
    st.add_argument("--lengths", choices=["fixed", "realistic"], default="fixed")
    st.add_argument("--workdir")
    st.add_argument("--reload", action="store_true", help="reload the saved adapter (peft; and unsloth) + forward")
    st.add_argument("--no-probe", action="store_true", help="run `python -m stages.sft stage1` literally")
    st.add_argument("--gc", choices=["unsloth", "true", "false"], default="unsloth",
                    help="lora.use_gradient_checkpointing")
    st.add_argument("--optim", choices=["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"],
                    help="train.optim (default: params.yaml's)")
    st.add_argument("--launch", type=int, default=1, help="GPUs: >1 runs the stage under accelerate launch (DDP)")
    rf = sub.choices["ref"]
    rf.add_argument("--mode", choices=["unsloth", "hf"], required=True)
    rf.add_argument("--raw-loop", default=str(ROOT / ".whl/raw_loop.py"))
    sub.add_parser("_probe")
    r = sub.add_parser("_reload")
    r.add_argument("--mode", choices=["peft", "unsloth"], required=True)
    r.add_argument("--workdir", required=True)
    r.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    su = sub.add_parser("suite")
    su.add_argument("--plan", required=True, help="comma-separated: tiny, gpu-1.5b, gpu-7b, gpu-14b")
    su.add_argument("--out", required=True)
    su.add_argument("--budget-s", type=float, default=500)
    su.add_argument("--model-root", default="/tmp/gpu_bench_models")
    su.add_argument("--work-root", default="/tmp/gpu_bench_work")
    su.add_argument("--raw-loop")
    su.add_argument("--only", help="comma-separated job indexes to run (builds always run)")
    a = ap.parse_args()
    {"build": cmd_build, "stage": cmd_stage, "ref": cmd_ref, "_probe": cmd_probe, "_reload": cmd_reload,
     "table": cmd_table, "suite": cmd_suite}[a.cmd](a)


if __name__ == "__main__":
    main()
