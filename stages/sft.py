"""sft-stage1 / sft-stage2: QLoRA SFT on the preprocessed set (Unsloth on CUDA, HF + PEFT elsewhere).

    python -m stages.sft stage1
    python -m stages.sft stage2

Both stages run this module with their own params section (`sft_stage1`, `sft_stage2`) and the
shared `model`, `lora` and `train` sections. Loss is on the response only (prompt labels -100,
EOS trained). Checkpoints go to models/checkpoints/<stage> (kept across reruns); a rerun resumes from
the newest complete one written by the same config. The adapter is promoted atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from kmed.config import Params, load_params, resolved_dict
from kmed.doctor import preflight
from kmed.io import (
    StageError,
    atomic_dir,
    lineage,
    no_space,
    read_jsonl,
    run_stage,
    write_json,
    write_text_atomic,
)
from kmed.modeling import device_has_bf16
from kmed.tracking import Tracker

log = logging.getLogger("stages.sft")

CKPT_ROOT = Path("models/checkpoints")
MIN_STAGE1_GAIN = 0.01  # nats: a smaller stage-1 gain (a 2-step test run) is noise, not judged by stage1_retained
OOM_HINT = ("lower train.per_device_train_batch_size or model.max_seq_length (raise "
            "train.gradient_accumulation_steps to keep the effective batch), or keep "
            "lora.use_gradient_checkpointing on")


# ---------------------------------------------------------------------------------------------
# Backend choice and paths
# ---------------------------------------------------------------------------------------------
def choose_backend(requested: str) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if has_cuda and has_unsloth else "hf"
    if requested == "unsloth" and not (has_cuda and has_unsloth):
        raise StageError("model.backend=unsloth needs CUDA and the unsloth package (pip install '.[gpu]').")
    return requested


STAGE1_ADAPTER = Path("models/stage1/adapter")


def stage_inputs(stage: str, params: Params) -> tuple[Path, Path | None]:
    """(model folder to start from, stage-1 adapter the stage starts from or None).

    base: the base model. merge_then_new_adapter: stage 1's merged 16-bit weights (re-quantized when
    model.load_in_4bit: stage 1's delta can round away). continue_adapter: the base with stage 1's LoRA,
    trained further. new_adapter_on_stage1: the base with stage 1's LoRA frozen and active, and a new LoRA
    trained beside it (`FrozenStage1`): stage 2 starts from exactly stage 1's model, in 4-bit too."""
    init = params.sft(stage).init
    if init == "base":
        return Path("models/base"), None
    if init == "merge_then_new_adapter":
        return Path("models/stage1/merged"), None
    return Path("models/base"), STAGE1_ADAPTER


def lora_shape(params: Params, stacked: bool) -> tuple[int, float]:
    """(rank, alpha) of the LoRA the stage trains. Stacked on stage 1 (new_adapter_on_stage1) it is one LoRA of
    twice the rank: ranks [0, r) hold stage 1's adapter (frozen), ranks [r, 2r) the new one. Alpha grows with
    the rank so that the scaling (alpha / r, or alpha / sqrt(r) with rslora) stays the one each adapter has
    alone: the stacked delta is exactly stage 1's delta + the new adapter's."""
    lc = params.lora
    if not stacked:
        return lc.r, lc.lora_alpha
    return 2 * lc.r, lc.lora_alpha * (2**0.5 if lc.use_rslora else 2)


def use_bf16(setting: Any) -> bool:
    has = device_has_bf16()
    if setting is True and not has:
        raise StageError("train.bf16=true but this device has no bf16 support; use bf16: auto.")
    return bool(has) if setting == "auto" else bool(setting)


def packing_mode(setting: str, fast_varlen: bool = False) -> tuple[bool, bool]:
    """(pack several samples per row, padding-free batches).

    padding_free: each micro-batch is flattened into one row with per-sample position ids —
    no pad tokens are computed and the model masks attention per sample, so it is exact and keeps
    the seed's samples-per-step. bfd: best-fit-decreasing packing up to max_length (more tokens per
    step). none: classic padded batches.

    auto (measured, bench/RESULTS.md): padding_free where `fast_varlen` — Unsloth with a flash varlen
    kernel (kmed.fastattn on torch 2.11): at 32B on realistic lengths 2,228 vs 1,782 real tok/s, no
    per-shape compile, 20.5 vs 21.3 GiB, same losses (session 4, call O). Else none: padded batches beat
    padding-free rows on CPU (303 vs 254 tok/s, sdpa's causal fast path) and under Unsloth without a
    varlen kernel (4,366 vs 3,179 tok/s at 7B, call C: one SDPA call per segment per layer)."""
    if setting == "auto":
        setting = "padding_free" if fast_varlen else "none"
    return {"padding_free": (False, True), "bfd": (True, True), "none": (False, False)}[setting]


def fingerprint(stage: str, params: Params, data_files: list[Path], start: Path,
                prev_adapter: Path | None = None) -> str:
    """Identity of a training run: checkpoints from another config or other code are never resumed.

    The code is this module and the kmed library: a finished checkpoint from older code would otherwise be
    promoted as is when `dvc repro` reruns the stage for a code change (no training, empty metrics)."""
    h = hashlib.sha256()
    h.update(stage.encode())
    root = Path(__file__).resolve().parents[1]
    for code in [Path(__file__).resolve(), *sorted((root / "kmed").glob("*.py"))]:
        h.update(code.read_bytes())
    keep = {k: resolved_dict(getattr(params, k)) for k in ("model", "lora", "train")}
    keep["stage"] = resolved_dict(params.sft(stage))
    h.update(json.dumps(keep, sort_keys=True).encode())
    for f in data_files:
        h.update(f.read_bytes())
    lin = start / "lineage.json"
    if lin.exists():
        h.update(lin.read_bytes())
    if prev_adapter is not None:  # stage 2 on stage 1's adapter: a retrained stage 1 is another run
        h.update((prev_adapter / "adapter_model.safetensors").read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_complete(ck: Path) -> bool:
    """A checkpoint counts only if its trainer state parses and its adapter weights are whole."""
    from safetensors import safe_open

    try:
        state = json.loads((ck / "trainer_state.json").read_text())
        if "global_step" not in state:
            return False
        with safe_open(str(ck / "adapter_model.safetensors"), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return all((ck / n).exists() for n in ("optimizer.pt", "scheduler.pt")) and resume_pickles_load(ck)
    except Exception:
        return False


def resume_pickles_load(ck: Path) -> bool:
    """The pickled files a resume reads (optimizer, scheduler, RNG, scaler) must load as plain tensors
    (`weights_only`, as the Trainer loads them): a file planted or damaged in the checkpoint folder
    fails here, is never unpickled further, and the checkpoint is skipped instead of crashing resume."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"):
        if (ck / name).exists():
            try:
                with safe_globals():
                    torch.load(ck / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                log.warning("%s/%s does not load as plain tensors (%s)", ck, name, type(e).__name__)
                return False
    return True


def newest_complete_checkpoint(ckdir: Path, fp: str) -> Path | None:
    if not ckdir.exists():
        return None
    stamp = ckdir / "FINGERPRINT"
    if not stamp.exists() or stamp.read_text().strip() != fp:
        log.info("checkpoints in %s belong to another config or code version; starting fresh", ckdir)
        shutil.rmtree(ckdir)
        return None
    cands = sorted(ckdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ck in cands:
        if checkpoint_complete(ck):
            return ck
        log.warning("skipping incomplete checkpoint %s", ck)
    return None


# ---------------------------------------------------------------------------------------------
# Model construction per backend
# ---------------------------------------------------------------------------------------------
def build_model(backend: str, start: Path, params: Params, bf16: bool,
                stacked: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Return (peft model, tokenizer, notes on what differs between backends). `stacked`: the LoRA has room
    for stage 1's adapter beside the new one (`lora_shape`)."""
    notes: dict[str, Any] = {"backend": backend}
    lc = params.lora
    rank, alpha = lora_shape(params, stacked)
    from kmed.modeling import load_tokenizer, refuse_unsafe_model

    refuse_unsafe_model(start, params.model.trust_remote_code)
    if backend == "unsloth":
        from unsloth import FastLanguageModel  # must be imported before transformers/trl

        from kmed.fastattn import enable_unsloth_varlen

        notes["packed_attention"] = enable_unsloth_varlen() or "unsloth default"

        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(start), max_seq_length=params.model.max_seq_length, dtype=None,
            load_in_4bit=params.model.load_in_4bit, trust_remote_code=params.model.trust_remote_code,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model, r=rank, target_modules=list(lc.target_modules), lora_alpha=alpha,
            lora_dropout=lc.lora_dropout, bias=lc.bias, use_gradient_checkpointing=lc.use_gradient_checkpointing,
            random_state=lc.random_state, use_rslora=lc.use_rslora, loftq_config=lc.loftq_config,
            max_seq_length=params.model.max_seq_length,
        )
        notes["quantization"] = "unsloth-4bit" if params.model.load_in_4bit else "none"
        return model, tok, notes

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(start)
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": params.model.trust_remote_code,
                          "attn_implementation": "sdpa"}
    if cuda and params.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        # One process per GPU under `accelerate launch` / torchrun: each loads onto its own device.
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
        notes["quantization"] = "bitsandbytes-nf4"
    else:
        if params.model.load_in_4bit:
            log.warning("model.load_in_4bit=true but there is no CUDA: training plain 16/32-bit LoRA instead")
        notes["quantization"] = "none (no CUDA)" if params.model.load_in_4bit else "none"
    kw["dtype"] = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(start), **kw)
    gc = lc.use_gradient_checkpointing
    if gc == "unsloth":
        notes["gradient_checkpointing"] = "hf (unsloth's CPU offload is unsloth-only)"
    if "quantization_config" in kw:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(gc),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc and not cuda:
        # Checkpointing trades compute for accelerator memory; on CPU there is none to save.
        notes["gradient_checkpointing"] = "off on CPU (no accelerator memory to save)"
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(lc.random_state)
    init: Any = True
    if lc.loftq_config:
        from peft import LoftQConfig

        init, notes["loftq"] = "loftq", True
    lcfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=lc.lora_dropout, target_modules=list(lc.target_modules),
        bias=lc.bias, use_rslora=lc.use_rslora, task_type="CAUSAL_LM", init_lora_weights=init,
        loftq_config=LoftQConfig(**lc.loftq_config) if lc.loftq_config else {},
    )
    model = get_peft_model(model, lcfg)
    # Training never needs a KV cache, and with one transformers skips the per-sample mask of
    # padding-free rows (attention would leak across samples).
    model.config.use_cache = False
    return model, tok, notes


def load_adapter_weights(model: Any, adapter: Path) -> None:
    """continue_adapter: start the fresh LoRA from the previous stage's trained weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    res = set_peft_model_state_dict(model, sd)
    missing = [k for k in res.unexpected_keys]
    if missing:
        raise StageError(f"{adapter}: adapter does not match lora params (unexpected key {missing[0]!r}).")


class FrozenStage1:
    """new_adapter_on_stage1: stage 1's trained LoRA as the frozen ranks [0, r) of the stage's rank-2r LoRA.

    The new adapter (ranks [r, 2r): A random, B zero) starts at zero, so the model before the first step is
    exactly stage 1's, whatever the base's precision (no re-quantized merge). Gradient hooks zero the frozen
    ranks' gradients (they take no part in clipping and Adam's moments stay zero there); `restore` writes
    their values back after every optimizer step (AdamW's decoupled weight decay shrinks every parameter).
    One PEFT adapter of rank 2r, not two adapters: Unsloth's fused LoRA kernels take one active adapter. The
    frozen ranks still get (zeroed) gradients and Adam states: +16 bytes per stage-1 LoRA parameter on the GPU
    (0.78 GiB measured at 7B; ~2.2 GB at 32B, which a 24 GB card running the seed's adamw_torch does not have:
    the recipe uses continue_adapter there, recipes/DEVIATIONS.md)."""

    def __init__(self, model: Any, adapter: Path, r: int) -> None:
        import torch
        from safetensors.torch import load_file

        cfg = json.loads((adapter / "adapter_config.json").read_text())
        if int(cfg.get("r", -1)) != r:
            raise StageError(f"{adapter}: stage 1's LoRA has rank {cfg.get('r')}, lora.r is {r}; rerun sft-stage1 "
                             "with the same lora params (`dvc repro`).")
        named = dict(model.named_parameters())
        self.frozen: list[tuple[Any, tuple[slice, slice], Any]] = []
        for key, w in load_file(str(adapter / "adapter_model.safetensors")).items():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            p = named.get(name)
            if p is None:
                raise StageError(f"{adapter}: adapter key {key!r} has no place in the stage's LoRA (lora params changed "
                                 "since sft-stage1); rerun it (`dvc repro`).")
            part = (slice(0, r), slice(None)) if ".lora_A." in name else (slice(None), slice(0, r))
            with torch.no_grad():
                p[part].copy_(w.to(p.dtype))
            p.register_hook(lambda g, part=part: _zero_part(g, part))
            # kept in host memory: 0.5 GB at 32B that the GPU does not have to hold (copied back once a step)
            self.frozen.append((p, part, p[part].detach().to("cpu", copy=True)))
        if not self.frozen:
            raise StageError(f"{adapter}: no LoRA weights found.")

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for p, part, value in self.frozen:
                p[part].copy_(value)

    def drift(self) -> float:
        """Largest change of a frozen weight since stage 1 (0.0 after `restore`)."""
        return max(float((p[part].detach().cpu() - v).abs().max()) for p, part, v in self.frozen)

    def frozen_numel(self) -> int:
        return sum(v.numel() for _, _, v in self.frozen)


def _zero_part(g: Any, part: tuple[slice, slice]) -> Any:
    g = g.clone()
    g[part] = 0
    return g


def stage1_retention(model: Any, tok: Any, params: Params, max_len: int) -> dict[str, float]:
    """Loss on stage 1's val split of the model stage 2 starts from, against stage 1's own start and end
    (its adapter's lineage.json): `stage1_retained` = the share of stage 1's val improvement still there.

    Fails the stage below `sft_stage2.min_stage1_retained`: the start lost stage 1 (e.g. its merged weights
    re-quantized to 4-bit, where a delta under half an NF4 step rounds back to the base)."""
    from kmed.lm import encode_records, masked_loss

    enc = encode_records(tok, load_split("stage1", "val"), max_len)
    if not enc:
        log.warning("stage 1 has no val records: stage1_retained not measured")
        return {}
    m = {"stage1_val_loss_at_start": masked_loss(model, enc, 8, tok.pad_token_id)["loss"]}
    lin = STAGE1_ADAPTER / "lineage.json"
    ref = json.loads(lin.read_text()) if lin.exists() else {}
    s, f = ref.get("val_loss_start"), ref.get("val_loss_final")
    if s is None or f is None:
        log.warning("%s carries no val losses (older sft-stage1): stage1_retained not judged", lin)
        return m
    m.update(stage1_val_loss_base=s, stage1_val_loss_final=f)
    gain = s - f
    if gain < MIN_STAGE1_GAIN:
        log.warning("stage 1 improved its val loss by only %.4f nats (%.4f -> %.4f): stage1_retained not judged",
                    gain, s, f)
        return m
    m["stage1_retained"] = (s - m["stage1_val_loss_at_start"]) / gain
    need = params.sft_stage2.min_stage1_retained
    log.info("stage 2 starts at val1 loss %.4f: stage 1 went %.4f -> %.4f, %.1f%% of its gain kept (need %.0f%%)",
             m["stage1_val_loss_at_start"], s, f, 100 * m["stage1_retained"], 100 * need)
    if m["stage1_retained"] < need:
        raise StageError(
            f"sft-stage2 starts from a model that kept {100 * m['stage1_retained']:.1f}% of stage 1's val-loss gain "
            f"(val1 loss {m['stage1_val_loss_at_start']:.4f}; stage 1 went {s:.4f} -> {f:.4f}), under "
            f"sft_stage2.min_stage1_retained={need:g}: with sft_stage2.init={params.sft_stage2.init} and "
            f"model.load_in_4bit={params.model.load_in_4bit} stage 1 is lost; set sft_stage2.init: "
            "new_adapter_on_stage1 or continue_adapter (bench/RESULTS.md, stage 2's start)."
        )
    return m


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_split(stage: str, split: str) -> list[dict[str, Any]]:
    path = Path("data/processed") / stage / f"{split}.jsonl"
    if not path.exists():
        raise StageError(f"{path} is missing; run `dvc repro preprocess` first.")
    rows = read_jsonl(path)
    if not rows and split == "train":
        raise StageError(f"{path} has no records.")
    return rows


class TokenCounter:
    """Counts real (non-pad) tokens entering the model's training forwards, for tokens/s.

    A forward pre-hook rather than a collator wrapper: the Trainer prefetches a whole
    gradient-accumulation window before the step begins, so collation time is not step time."""

    def __init__(self, model: Any) -> None:
        self._done, self._pending = 0, []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    @property
    def tokens(self) -> int:
        """Resolved lazily: a per-forward .item() would sync the GPU and stall the next launch."""
        if self._pending:
            self._done += int(sum(int(x) for x in self._pending))
            self._pending = []
        return self._done

    def _hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if module.training:
            self.count({"input_ids": args[0] if args else None, **kwargs})

    def count(self, inputs: dict[str, Any]) -> None:
        mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
        if mask is not None:
            self._pending.append(mask.sum())
        elif ids is not None:  # padding-free rows carry no pad tokens
            self._pending.append(ids.numel())


# ---------------------------------------------------------------------------------------------
# Callback: per-step records, NaN guard, progress log
# ---------------------------------------------------------------------------------------------
def make_callback(tracker: Tracker, counter: TokenCounter, patience: int, console_every: int, curve: list) -> Any:
    import torch
    from transformers import TrainerCallback

    class Records(TrainerCallback):
        def __init__(self) -> None:
            self.bad, self.nan_step, self.t, self.tok0 = 0, None, time.time(), 0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 0 or self.t is None:
                self.t, self.tok0 = time.time(), counter.tokens

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            now = time.time()
            dt = max(now - self.t, 1e-9)
            tps = (counter.tokens - self.tok0) / dt
            self.t, self.tok0 = now, counter.tokens
            peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            row = {"step": state.global_step, "loss": loss, "learning_rate": float(logs.get("learning_rate", 0.0)),
                   "grad_norm": float(logs.get("grad_norm", float("nan"))), "tokens_per_s": tps,
                   "peak_mem_gib": peak}
            curve.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step" and math.isfinite(v)},
                                step=state.global_step)
            if state.global_step % console_every == 0:
                log.info("step %d loss %.4f lr %.2e grad %.3f tok/s %.0f", state.global_step, loss,
                         row["learning_rate"], row["grad_norm"], tps)
            if not math.isfinite(loss) or not math.isfinite(row["grad_norm"]):
                self.bad += 1
                if self.bad >= patience:
                    self.nan_step = state.global_step
                    control.should_training_stop = True
                    control.should_save = False
            else:
                self.bad = 0

    return Records()


def restore_callback(frozen: FrozenStage1) -> Any:
    from transformers import TrainerCallback

    class RestoreFrozen(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            frozen.restore()  # after the optimizer step, before a checkpoint is saved

    return RestoreFrozen()


def steady_tps(curve: list[dict[str, Any]]) -> float | None:
    rows = [r["tokens_per_s"] for r in curve[len(curve) // 4 :] if r["tokens_per_s"] > 0]
    return sorted(rows)[len(rows) // 2] if rows else None


def selective_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
    """Causal-LM loss that projects through the LM head only where a label is trained.

    Same value as the model's own shifted cross-entropy, but the prompt positions (about half the
    tokens here) skip the vocabulary projection and softmax — the job TRL's Triton fused head does
    on CUDA. Used where Triton is absent (CPU torch), where TRL 1.15's fused path would crash."""
    import torch

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:].to(hidden.device)
    mask = target != -100
    logits = base.lm_head(hidden[mask]).float()
    loss = torch.nn.functional.cross_entropy(logits, target[mask], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return loss / denom


def trainer_class(sft_trainer: type) -> type:
    """TRL's SFTTrainer, with the selective-head loss where TRL's Triton kernel is unavailable."""
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return sft_trainer

    class SelectiveHeadSFTTrainer(sft_trainer):  # type: ignore[misc, valid-type]
        token_counter: TokenCounter | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            if hasattr(model, "require_backward_grad_sync"):  # DistributedDataParallel: the gradient
                # all-reduce is armed by the wrapper's own forward, so the backbone cannot be called
                # directly; the model's own loss (the token counter's hook sees this forward).
                out = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
                loss = out.loss
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # num_items_in_batch counts every rank's labels and DDP averages the ranks'
                    # gradients: scale back up, as Trainer.compute_loss does.
                    loss = loss * self.accelerator.num_processes
                return (loss, out) if return_outputs else loss
            if self.token_counter is not None and model.training:
                self.token_counter.count(inputs)  # the backbone is called directly: no top-level hook fires
            loss = selective_lm_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return SelectiveHeadSFTTrainer


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["stage1", "stage2"])
    stage = ap.parse_args().stage

    # Config: validate, resolve backend and precision, log it all first.
    params = load_params()
    preflight(f"sft-{stage}", params)
    scfg = params.sft(stage)
    backend = choose_backend(params.model.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (patches transformers/trl before they are imported)
    import torch
    from transformers import set_seed

    bf16 = use_bf16(params.train.bf16)
    max_steps = scfg.max_steps or params.train.max_steps
    start, prev_adapter = stage_inputs(stage, params)
    sec = {k: resolved_dict(getattr(params, k)) for k in ("model", "lora", "train")}
    sec[f"sft_{stage}"] = resolved_dict(scfg)
    log.info("sft %s: backend=%s bf16=%s packing=%s start=%s max_steps=%d", stage, backend, bf16,
             params.train.packing, start, max_steps)
    log.info("resolved config: %s", json.dumps(sec, ensure_ascii=False))
    if not (start / "config.json").exists():
        raise StageError(f"{start} has no model; run the earlier stages first (`dvc repro`).")
    if scfg.init == "merge_then_new_adapter" and params.model.load_in_4bit and torch.cuda.is_available():
        # Measured at 7B (bench/RESULTS.md, stage 2's start): stage 2's val loss started at the base's 12.55, not
        # stage 1's 9.58, because a stage-1 delta under half an NF4 step rounds back to the base's code.
        log.warning("sft %s: %s (stage 1 merged) is loaded back in 4-bit; LoRA deltas smaller than an NF4 step "
                    "round back to the base. sft_%s.init: continue_adapter or new_adapter_on_stage1 keeps stage 1 exact "
                    "(bench/RESULTS.md); stage1_retained below measures it.", stage, start, stage)
    stacked = scfg.init == "new_adapter_on_stage1"

    # Seed.
    set_seed(params.train.seed)

    # Data: pre-tokenized with labels masked on the prompt.
    from datasets import Dataset

    from kmed.lm import encode_records, masked_loss

    train_rows, val_rows = load_split(stage, "train"), load_split(stage, "val")
    ckdir = CKPT_ROOT / stage
    fp = fingerprint(stage, params, [Path(f"data/processed/{stage}/{s}.jsonl") for s in ("train", "val")], start,
                     prev_adapter)

    # Model.
    t_load = time.time()
    try:
        model, tok, notes = build_model(backend, start, params, bf16, stacked)
    except torch.cuda.OutOfMemoryError as e:
        raise StageError(f"CUDA out of memory while loading {start}: {OOM_HINT}.") from e
    frozen = None
    if stacked:
        frozen = FrozenStage1(model, prev_adapter, params.lora.r)
        notes["stacked_on"] = f"{prev_adapter} (ranks 0-{params.lora.r - 1} of the saved LoRA, frozen)"
    elif prev_adapter is not None:
        load_adapter_weights(model, prev_adapter)
        notes["continued_from"] = str(prev_adapter)
    # Packing is resolved once the model is built: `auto` depends on the attention kernel Unsloth got.
    from kmed.fastattn import unsloth_packed_kernel

    packing, padding_free = packing_mode(params.train.packing, backend == "unsloth" and unsloth_packed_kernel())
    notes["batches"] = "packed (bfd)" if packing else "padding-free" if padding_free else "padded"
    log.info("batches: %s (train.packing=%s)", notes["batches"], params.train.packing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - (frozen.frozen_numel() if frozen else 0)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable params: %d of %d (%.3f%%); notes: %s", trainable, total, 100 * trainable / total, notes)
    max_len = params.model.max_seq_length
    train_enc = encode_records(tok, train_rows, max_len)
    val_enc = encode_records(tok, val_rows, max_len)
    ds = Dataset.from_list(train_enc)
    val_before = masked_loss(model, val_enc, 8, tok.pad_token_id) if val_enc else None
    # Stage 2 must start where stage 1 ended: measured before the first step, fails the stage if lost.
    retention = stage1_retention(model, tok, params, max_len) if stage == "stage2" else {}

    # Train.
    from trl import SFTConfig, SFTTrainer

    resume = newest_complete_checkpoint(ckdir, fp)
    ckdir.mkdir(parents=True, exist_ok=True)
    (ckdir / "FINGERPRINT").write_text(fp + "\n")
    t = params.train
    args = SFTConfig(
        output_dir=str(ckdir), per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, warmup_steps=t.warmup_steps,
        max_steps=max_steps, learning_rate=t.learning_rate, bf16=bf16, fp16=False,
        # Every step on CPU (free there); on CUDA every train.logging_steps: a per-step loss read
        # syncs the GPU and stalls the next step's kernel launches.
        logging_steps=t.logging_steps if torch.cuda.is_available() else 1,
        optim=t.optim, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type, seed=t.seed,
        data_seed=t.seed, max_grad_norm=t.max_grad_norm, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=[], packing=packing,
        max_length=max_len if packing else None,  # encode_records already cut each sample to max_len
        packing_strategy="bfd", padding_free=padding_free, logging_nan_inf_filter=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, disable_tqdm=False,
        dataset_num_proc=None, save_only_model=False, ddp_find_unused_parameters=False,
    )
    if args.n_gpu > 1:
        # One process that sees several GPUs: the Trainer would multiply the batch by their number
        # (and the effective batch of params.yaml would silently change). Train on one GPU, say how to use all.
        log.warning("%d GPUs visible to one process: training on one of them; to use all, run `accelerate launch "
                    "--multi_gpu --num_processes %d -m stages.sft %s` (README, Several GPUs)", args.n_gpu, args.n_gpu,
                    stage)
        args._n_gpu = 1
    curve: list[dict[str, Any]] = []
    t_train = time.time()
    # Under `accelerate launch` / torchrun every rank runs this; only rank 0 records to MLflow.
    rank0 = os.environ.get("RANK", "0") == "0"
    mlcfg = params.mlflow if rank0 else params.mlflow.model_copy(update={"enabled": False})
    with Tracker(mlcfg, f"sft-{stage}", resolved_dict(params)) as tracker:
        trainer = trainer_class(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok)
        counter = TokenCounter(trainer.model)
        trainer.token_counter = counter
        cb = make_callback(tracker, counter, t.nan_patience, t.logging_steps, curve)
        trainer.add_callback(cb)
        if frozen is not None:
            trainer.add_callback(restore_callback(frozen))
        if resume:
            log.info("resuming from %s", resume)
        # A kill after the last checkpoint (global_step == max_steps) but before promotion: training is
        # done. Resumed mid-epoch, the Trainer would still take one more step (it checks max_steps only
        # after a step), so the rerun takes that checkpoint's adapter as the uninterrupted run would.
        finished = resume is not None and json.loads((resume / "trainer_state.json").read_text())["global_step"] >= max_steps
        try:
            if finished:
                load_adapter_weights(model, resume)
                trainer.state.global_step = max_steps
            else:
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError as e:
            raise StageError(f"CUDA out of memory in sft-{stage}: {OOM_HINT}.") from e
        except Exception as e:
            if no_space(e, ckdir):
                raise StageError(f"No space left on device while saving a checkpoint under {ckdir} (earlier "
                                 "complete checkpoints are kept and resumed from); free space there and rerun.") from e
            raise
        if cb.nan_step is not None:
            raise StageError(
                f"sft-{stage}: loss became non-finite at step {cb.nan_step}; no adapter was promoted "
                "(lower train.learning_rate or check the data)."
            )
        train_s = time.time() - t_train
        # The peak at the end of training, whatever the logging cadence (a run shorter than
        # train.logging_steps logs no curve row on CUDA, and its peak was 0.0).
        peak_end = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        world = trainer.args.world_size
        tokens = counter.tokens
        if world > 1:  # every rank's tokens (collective: all ranks reach this line)
            total_t = torch.tensor([tokens], dtype=torch.int64, device=trainer.args.device)
            torch.distributed.all_reduce(total_t)
            tokens = int(total_t.item())
        if not trainer.is_world_process_zero():
            return  # under DDP only rank 0 evaluates, saves and records

        if frozen is not None and frozen.drift() != 0.0:
            raise StageError(f"sft-{stage}: stage 1's frozen LoRA ranks changed in training (max {frozen.drift():.3g}); "
                             "nothing promoted.")
        # Save: adapter into a temporary sibling, renamed when whole.
        val_after = masked_loss(model, val_enc, 8, tok.pad_token_id) if val_enc else None
        out = Path(f"models/{stage}/adapter")
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            write_json(tmp / "lineage.json", lineage(
                f"sft-{stage}", sec, start=str(start), notes=notes, fingerprint=fp,
                resumed_from=str(resume) if resume else None,
                # what stage 2 compares its start with (stage1_retained)
                val_loss_start=val_before["loss"] if val_before else None,
                val_loss_final=val_after["loss"] if val_after else None))

        # Metrics: flat JSON + TSV curve, mirrored to MLflow.
        steps_done = trainer.state.global_step
        losses = [r["loss"] for r in curve]
        metrics = {
            "train_loss_first": losses[0] if losses else None,
            "train_loss_final": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
            "val_loss_start": val_before["loss"] if val_before else None,
            "val_loss_final": val_after["loss"] if val_after else None,
            "val_ppl_final": val_after["ppl"] if val_after else None,
            "steps": steps_done,
            "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
            "world_size": world,
            "tokens_seen": tokens,
            "tokens_per_s": tokens / max(train_s, 1e-9),
            # median over logged windows after the first quarter (compilation, warm-up); rank 0's
            # windows times the number of ranks under DDP (the ranks step in lockstep)
            "tokens_per_s_steady": steady * world if (steady := steady_tps(curve)) else None,
            "train_seconds": round(train_s, 1),
            "load_seconds": round(t_train - t_load, 1),
            "peak_mem_gib": max([peak_end] + [r["peak_mem_gib"] for r in curve]),
            # what the caching allocator held at most: the number a card's capacity must cover (CUDA only)
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
            "trainable_params": trainable,
            "train_rows": len(train_rows),
            **retention,
        }
        write_json(f"metrics/sft-{stage}.json", {k: v for k, v in metrics.items() if v is not None})
        write_text_atomic(
            f"metrics/sft-{stage}-curve.tsv",
            "step\tloss\tlearning_rate\tgrad_norm\ttokens_per_s\n"
            + "".join(f"{r['step']}\t{r['loss']:.6f}\t{r['learning_rate']:.6e}\t{r['grad_norm']:.6f}\t"
                      f"{r['tokens_per_s']:.1f}\n" for r in curve),
        )
        tracker.log_metrics({f"final.{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
        tracker.log_artifact(f"metrics/sft-{stage}.json")
    log.info("sft-%s done: %s", stage, metrics)
    os.environ.pop("KMED_TMP", None)


def end_distributed() -> None:
    """Under `accelerate launch` / torchrun: leave the process group (NCCL warns of leaked resources otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        run_stage(main)
    finally:
        end_distributed()
