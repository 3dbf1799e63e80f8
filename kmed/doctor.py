"""Pre-flight check: will a stage fit this machine's free disk, RAM and GPU memory?

    python -m kmed.doctor                           # every heavy stage, one need-vs-free table each
    python -m kmed.doctor merge@stage1 export       # or some (`sft`, `merge` name both of theirs)
    python -m kmed.doctor --params recipes/r1-32b-medical-ko.yaml

Each heavy stage (sft-stage1/2, merge@stage1/2, evaluate, export) calls `preflight(<stage>, params)` right
after loading its params, before it touches any output. `doctor.mode: fail` (default) stops a stage that
would run short with exit 2 and one sentence naming what is short and by how much; `warn` logs that
sentence and goes on; `off` skips the check. Every need is multiplied by `doctor.headroom` first. The CLI
exits 2 when any stage would be short.

Sizes come from the model's config.json (models/base; before prepare-base, a local folder or the Hugging
Face cache copy of `model.base`; otherwise it says it cannot estimate yet). Symbols: P parameters of the
dense decoder (`Arch.param_count`), E of them in the embedding and output matrices, A LoRA parameters
(L·r·Σ(in + out) over lora.target_modules), h hidden, I intermediate, L layers, V vocabulary,
t = per_device_train_batch_size × model.max_seq_length tokens, o optimizer bytes per LoRA parameter
(8 AdamW, 2 8-bit AdamW), tok the tokenizer files, GB = 10^9 bytes.

  sft    GPU    VRAM 0.52·(P-E) + 2·E    NF4 weights and scales (4-bit; else 2·P), 16-bit embeddings
                     + (8 + o)·A         fp32 LoRA weights and grads, optimizer states
                     + 2·(6h + 2I)·t·k   activations of k layers (1 with checkpointing, else L)
                     + 2·t·V             logits
                Fitted to the stage's peaks in bench/RESULTS.md (1.5B-32B, Unsloth, -6%..+4%;
                tests/test_doctor.py); RAM 2 GB + the largest base shard + 2·L·t·h (Unsloth's
                checkpointing keeps layer inputs in host RAM), per process on the host under DDP.
  sft    CPU    RAM  (2|4)·P + (8 + o)·A + (2|4)·(6h + 2I)·t·L + 4·t·V + 1 GB  (bf16 or fp32; no 4-bit and
                no checkpointing on the CPU)
  sft    disk   models/<stage>/adapter 4·A + tok; models/checkpoints/<stage> min(save_total_limit + 1,
                saves)·((4 + o)·A + tok + 1 MB), less what is there already
  merge         RAM merge.max_shard_size + adapter + 1 GB (the streaming merge); disk 2·P + tok
  evaluate CPU  RAM  4·P + 4·V·b·(max_seq_length + max_new_tokens) + 1 GB (fp32), b = evaluate.batch_size
                (8 for auto)
  evaluate GPU  VRAM 0.52·(P-E) + 2·E    NF4 weights, 16-bit embeddings: the fallback of
                                         kmed.modeling.load_for_inference (bf16 when 1.25 × the checkpoint
                                         fits), so only a model that does not fit even in 4-bit is refused
                     + kv·b·n            KV cache, kv = 2·L·kv_heads·head_dim·2 bytes a token,
                                         n = max_seq_length + max_new_tokens; b = evaluate.batch_size, 1 for
                                         auto (the batch is then sized to what is free: kmed.lm.auto_batch_size)
                     + 4·V·max(b, 1024)  fp32 logits: a batch's last positions, or kmed.lm.masked_loss's
                                         1024-row chunk
                RAM 1 GB + the largest shard: models/base's (5 GB before prepare-base) or merge.max_shard_size
  export GPU    VRAM as evaluate GPU with b = 1, n = max(max_seq_length + parity_tokens, check_max_tokens) and
                4·V·check_max_tokens logits (the merged model as the parity reference, placed by
                load_for_inference; it is freed before llama.cpp opens a GGUF, which offloads only the layers
                that fit: kmed.ggufio.gpu_offload); RAM the larger of 1 GB + the largest shard and
                2 GB + 6·max(V·h, I·h): llama.cpp's converter beside the stage, the largest tensor read as
                16-bit and widened to fp32 (fitted at 7B on the H200)
  export CPU    RAM the larger of 4·P + 1 GB (the merged model in fp32 as the parity reference, freed before
                conversion) and the converter's 2 GB + 6·max(V·h, I·h)
  export        disk 2·P (f16 GGUF, always written first) + Σ bytes/param of each quantization·P
                (q8_0 1.07, q6_k 0.82, q5_k_m 0.71, q4_k_m 0.6)

GPU memory free is asked of cuda:LOCAL_RANK (sft) or cuda:0 (evaluate, export) and capped by KMED_GPU_MEM_GB
(GiB), as kmed.modeling.load_for_inference caps it.

Evaluate's duration (`evaluate_eta`, logged by the stage before its first model): from rates measured on one
H200 with the stage's own code (bench/RESULTS.md, "GPU: evaluate's engines"), scaled to the card by its memory
bandwidth (decode) and dense bf16 FLOP/s (forwards) when `CARDS` names it. Per model: load (checkpoint at
1 GB/s), the decode step's compile (2.8 s a layer), val and MCQ forwards (2·P FLOP a token at 5.5e14 FLOP/s
in bf16, 4.7e14 in nf4), and each generation batch: its prefill, then max_new_tokens decode steps of
4.2 ms + 2·P / (3.78e12 B/s bf16, 0.94e12 nf4) + 3.58e-12 s·kv·b·(prompt + max_new_tokens). An upper bound
for generation: every sequence is taken to run to max_new_tokens.

DVC commit (`dvc repro` stores a cached output in .dvc/cache): free when the cache type list starts with
`hardlink` and the cache is on the output's filesystem (.dvc/config); otherwise the output's size again,
on the cache's filesystem, less what replacing the old output frees there. Run from the CLI (before
`dvc repro`), a persist output that is linked to the cache also costs its size once: DVC unprotects
(copies) it before it reruns the stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmed.config import Params, load_params
from kmed.io import StageError, gpu_free_planned

log = logging.getLogger("kmed.doctor")

STAGES = ("sft-stage1", "sft-stage2", "merge@stage1", "merge@stage2", "evaluate", "export")
GB = 10**9
# Bytes per parameter of each GGUF type (llama.cpp's bits per weight / 8, embeddings included).
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.82, "q5_k_m": 0.71, "q4_k_m": 0.6}
NF4_BYTES = 0.52  # 4-bit NF4 weight + its double-quantized scales (bitsandbytes, Unsloth)
BASE_RAM = 1 * GB  # interpreter, torch, tokenizer, data
LOSS_CHUNK = 1024  # label positions kmed.lm.masked_loss projects onto the vocabulary at a time
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# Model size from config.json
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """The sizes of a dense decoder (Qwen2, Llama, Mistral...) that the estimates need."""

    h: int
    layers: int
    inter: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Arch:
        cfg = cfg.get("text_config") or cfg  # multimodal configs nest the decoder's
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            h=h,
            layers=int(cfg["num_hidden_layers"]),
            inter=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            tied=bool(cfg.get("tie_word_embeddings", False)),  # unsaid: untied, the larger (safer) count
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
        )

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (the LoRA targets)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.h, q),
            "k_proj": (self.h, kv),
            "v_proj": (self.h, kv),
            "o_proj": (q, self.h),
            "gate_proj": (self.h, self.inter),
            "up_proj": (self.h, self.inter),
            "down_proj": (self.inter, self.h),
        }

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.h * (1 if self.tied else 2)

    def param_count(self) -> int:
        """Embeddings (+ untied head) + L × (7 linear layers + q/k/v bias + 2 norms) + final norm."""
        linear = sum(i * o for i, o in self.module_dims().values())
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.embedding_params + self.layers * (linear + bias + 2 * self.h) + self.h

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """L · r · Σ(in + out) over the targeted linear layers (A: r×in, B: out×r)."""
        return self.layers * sum(r * (i + o) for k, (i, o) in self.module_dims().items() if k in targets)


def find_config(params: Params, root: Path) -> tuple[dict[str, Any], Path] | None:
    """The model's config.json: models/base, else model.base as a local folder or a Hugging Face cache copy."""
    cands = [root / "models/base/config.json", root / params.model.base / "config.json"]
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(params.model.base, "config.json", revision=params.model.revision)
        if isinstance(hit, str):
            cands.append(Path(hit))
    except Exception:  # not a Hub id, or no cache: nothing to find there
        pass
    for c in cands:
        if c.is_file():
            return json.loads(c.read_text(encoding="utf-8")), c
    return None


def folder_bytes(path: Path, weights: bool | None = None) -> int:
    """Size of the files under `path` (weights=True: weight files only; False: all but weights)."""
    if not path.exists():
        return 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if weights is not None:
        files = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES) == weights]
    return sum(p.stat().st_size for p in files)


def parse_size(s: str) -> int:
    """'2GB' / '500MB' / '5GiB' (transformers' max_shard_size) in bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", s.upper())
    if not m:
        return 5 * GB
    mult = 1024 if m.group(3) == "IB" else 1000
    return int(float(m.group(1)) * mult ** "_KMGT".index(m.group(2) or "_"))


# ---------------------------------------------------------------------------------------------
# What the machine has
# ---------------------------------------------------------------------------------------------
def existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def mount_point(path: Path) -> str:
    p = existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def free_disk(path: Path) -> int:
    return shutil.disk_usage(existing(path)).free


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def free_vram(device: int) -> int | None:
    """Free memory of a GPU (at most KMED_GPU_MEM_GB GiB when set), asked in a child process: initialising
    CUDA here would fix the caching allocator's settings before the stage's libraries set theirs (Unsloth
    sets expandable_segments)."""
    code = "import sys, torch; print(torch.cuda.mem_get_info(int(sys.argv[1]))[0])"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(device)], capture_output=True, text=True, timeout=120
        )
        free = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    return None if free is None else gpu_free_planned(free)


def device_has_bf16(cuda: bool) -> bool:
    """As stages/sft.py decides bf16: the GPU's support, or native bf16 matmul on the CPU."""
    import torch

    if cuda:
        return torch.cuda.is_bf16_supported()
    return any(
        getattr(torch.cpu, f, lambda: False)()
        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


# ---------------------------------------------------------------------------------------------
# DVC's share of the disk
# ---------------------------------------------------------------------------------------------
def dvc_cache(root: Path) -> tuple[list[str], Path] | None:
    """(cache link types, cache folder) from .dvc/config and .dvc/config.local; None outside a DVC repo."""
    if not (root / ".dvc").is_dir():
        return None
    import configparser  # reads DVC's config files (configobj syntax) well enough for two keys

    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])  # local overrides
    types = cp.get("cache", "type", fallback="reflink,copy").strip("\"' ")  # DVC's default: reflink,copy
    cdir = cp.get("cache", "dir", fallback="cache").strip("\"' ")
    return [t.strip() for t in types.split(",") if t.strip()], (root / ".dvc" / cdir).resolve()


def linked_and_copied(out: Path) -> tuple[int, int]:
    """Bytes of the output's files that are links to the cache (hardlink or symlink) and that are plain copies."""
    linked = copied = 0
    if out.exists():
        for p in out.rglob("*") if out.is_dir() else [out]:
            st = p.lstat()
            if p.is_symlink():
                linked += p.stat().st_size if p.exists() else 0
            elif p.is_file():
                if st.st_nlink > 1:
                    linked += st.st_size
                else:
                    copied += st.st_size
    return linked, copied


def output_disk(root: Path, out: str, size: int, planning: bool) -> list[tuple[Path, int]]:
    """(a path on each filesystem, bytes needed there) to write `size` bytes as output `out` and let DVC
    commit it. U: DVC's unprotect copy of a linked persist output (planning only: inside a stage it has
    happened already); F: what deleting the old output frees; C: the commit's copy into the cache."""
    path = root / out
    linked, copied = linked_and_copied(path)
    unprotect = linked if planning else 0
    freed = copied + unprotect
    cache = dvc_cache(root)
    if cache is None:
        return [(path, unprotect + size)]
    types, cdir = cache
    same_fs = existing(cdir).stat().st_dev == existing(path).stat().st_dev
    if not same_fs:  # hardlinks can't cross: the commit copies into the cache's disk (then symlinks back)
        return [(path, unprotect + size), (cdir, size)]
    commit = 0 if types[0] == "hardlink" else size  # reflink first: a copy on ext4 (DVC 3.67, no relink)
    return [(path, unprotect + size + max(0, commit - freed))]


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------
@dataclass
class Need:
    resource: str  # "disk" | "RAM" | "VRAM"
    where: str  # mount point (disk), "host" (RAM), "cuda:N" (VRAM)
    what: str  # the outputs a disk need is for, or what the memory holds
    need: int | None  # bytes before headroom; None: cannot estimate
    have: int | None  # bytes free / available; None: unknown
    how: str  # the estimate, in words

    def short_by(self, headroom: float) -> int:
        if self.need is None or self.have is None:
            return 0
        return max(0, math.ceil(self.need * headroom) - self.have)


def base_shard(root: Path) -> int:
    """The largest safetensors shard of models/base (5 GB, a Hub model's usual shard, before prepare-base)."""
    return max((p.stat().st_size for p in (root / "models/base").glob("*.safetensors")), default=5 * GB)


def opt_bytes(params: Params) -> int:
    return 2 if "8bit" in params.train.optim else 8


def sft_gpu_bytes(arch: Arch, params: Params) -> int:
    """VRAM of sft on one GPU (the module docstring's formula, fitted to bench/RESULTS.md)."""
    P, E, L = arch.param_count(), arch.embedding_params, arch.layers
    A = arch.lora_params(params.lora.r, params.lora.target_modules)
    t = params.train.per_device_train_batch_size * params.model.max_seq_length
    weights = NF4_BYTES * (P - E) + 2 * E if params.model.load_in_4bit else 2 * P
    stored = 1 if params.lora.use_gradient_checkpointing else L  # checkpointing: only the recomputed layer
    act = 2 * (6 * arch.h + 2 * arch.inter) * t * stored
    return int(weights + (8 + opt_bytes(params)) * A + act + 2 * t * arch.vocab)


def sft_cpu_bytes(arch: Arch, params: Params, bf16: bool) -> int:
    """RAM of sft on the CPU: 16- or 32-bit weights, no checkpointing, fp32 logits."""
    P, A = arch.param_count(), arch.lora_params(params.lora.r, params.lora.target_modules)
    wb = 2 if bf16 else 4
    t = params.train.per_device_train_batch_size * params.model.max_seq_length
    act = wb * (6 * arch.h + 2 * arch.inter) * t * arch.layers
    return int(wb * P + (8 + opt_bytes(params)) * A + act + 4 * t * arch.vocab + BASE_RAM)


def sft_needs(stage: str, params: Params, arch: Arch, root: Path, planning: bool, cuda: bool) -> list[Need]:
    A = arch.lora_params(params.lora.r, params.lora.target_modules)
    o, bs, seq = opt_bytes(params), params.train.per_device_train_batch_size, params.model.max_seq_length
    gc = params.lora.use_gradient_checkpointing
    needs: list[Need] = []
    if cuda:
        dev = int(os.environ.get("LOCAL_RANK", 0))
        wtxt = f"{NF4_BYTES}·(P-E) + 2·E" if params.model.load_in_4bit else "2·P"
        needs.append(
            Need(
                "VRAM",
                f"cuda:{dev}",
                "weights, LoRA + optimizer, activations",
                sft_gpu_bytes(arch, params),
                free_vram(dev),
                f"{wtxt} + (8+{o})·A + 2·(6h+2I)·t·{1 if gc else 'L'} + 2·t·V at {bs}×{seq}",
            )
        )
        shard = base_shard(root)
        offload = 2 * arch.layers * bs * seq * arch.h if gc == "unsloth" else 0
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # DDP ranks on this host share its RAM
        needs.append(
            Need(
                "RAM",
                "host",
                "loading shard, offloaded activations",
                (2 * BASE_RAM + shard + offload) * procs,
                mem_available(),
                "2 GB + largest base shard + 2·L·t·h (Unsloth's checkpointing offload)"
                + (f", × {procs} processes on this host" if procs > 1 else ""),
            )
        )
    else:
        bf16 = params.train.bf16 is not False and device_has_bf16(False)
        wb = 2 if bf16 else 4
        needs.append(
            Need(
                "RAM",
                "host",
                "weights, LoRA + optimizer, activations",
                sft_cpu_bytes(arch, params, bf16),
                mem_available(),
                f"{wb}·P + (8+{o})·A + {wb}·(6h+2I)·t·L + 4·t·V + 1 GB at {bs}×{seq} "
                "(CPU: no 4-bit, no checkpointing)",
            )
        )
    # Disk: the adapter (DVC output) and the resume checkpoints (not cached).
    tok = folder_bytes(root / "models/base", weights=False)
    adapter = 4 * A + tok
    ck_one = A * (4 + o) + tok + 1_000_000
    max_steps = params.sft(stage).max_steps or params.train.max_steps
    n_ck = min(params.train.save_total_limit + 1, max(1, max_steps // params.train.save_steps))
    ckdir = f"models/checkpoints/{stage}"
    ck_need = max(0, n_ck * ck_one - folder_bytes(root / ckdir))
    disk = output_disk(root, f"models/{stage}/adapter", adapter, planning=planning)
    disk.append((root / ckdir, ck_need))
    needs += disk_needs(disk, root, f"models/{stage}/adapter (4·A) + {n_ck} checkpoints ((4+{o})·A each)")
    return needs


def merge_needs(stage: str, params: Params, arch: Arch, root: Path, planning: bool) -> list[Need]:
    P = arch.param_count()
    A = arch.lora_params(params.lora.r, params.lora.target_modules)
    adapter = folder_bytes(root / f"models/{stage}/adapter", weights=True) or 4 * A
    shard = min(parse_size(params.merge.max_shard_size), 2 * P)  # a model smaller than one shard is one shard
    needs = [
        Need(
            "RAM",
            "host",
            "one shard + adapter (streaming merge)",
            shard + adapter + BASE_RAM,
            mem_available(),
            "merge.max_shard_size + adapter + 1 GB",
        )
    ]
    size = 2 * P + folder_bytes(root / "models/base", weights=False)
    disk = output_disk(root, f"models/{stage}/merged", size, planning=planning)
    return needs + disk_needs(disk, root, "2·P (16-bit safetensors) + tokenizer")


def kv_bytes(arch: Arch) -> int:
    """KV cache of one token: K and V of every layer, 16-bit."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * 2


def infer_gpu_bytes(arch: Arch, batch: int, tokens: int, logit_rows: int) -> int:
    """VRAM of a model placed by load_for_inference in its 4-bit fallback (bf16 only when that fits with
    25 % to spare): NF4 weights, 16-bit embeddings, the KV cache of batch×tokens, fp32 logits."""
    P, E = arch.param_count(), arch.embedding_params
    return int(NF4_BYTES * (P - E) + 2 * E + kv_bytes(arch) * batch * tokens + 4 * arch.vocab * logit_rows)


def infer_gpu_needs(params: Params, arch: Arch, root: Path, batch: int, tokens: int, logit_rows: int,
                    what: str) -> list[Need]:
    """VRAM on cuda:0 and host RAM of a stage that loads models with load_for_inference on the GPU."""
    shard = max(base_shard(root), parse_size(params.merge.max_shard_size))
    return [
        Need(
            "VRAM",
            "cuda:0",
            what,
            infer_gpu_bytes(arch, batch, tokens, logit_rows),
            free_vram(0),
            f"{NF4_BYTES}·(P-E) + 2·E (nf4; bf16 when 2·P·1.25 fits) + kv·{batch}·{tokens} "
            f"(kv = 2·L·kv_heads·head_dim·2) + 4·V·{logit_rows} logits",
        ),
        Need(
            "RAM",
            "host",
            "loading shard",
            BASE_RAM + shard,
            mem_available(),
            "1 GB + largest shard (the weights go to the GPU)",
        ),
    ]


def evaluate_needs(params: Params, arch: Arch, root: Path, cuda: bool) -> list[Need]:
    P, ec = arch.param_count(), params.evaluate
    n = params.model.max_seq_length + ec.max_new_tokens
    if cuda:
        b = ec.batch_size if isinstance(ec.batch_size, int) else 1  # auto sizes itself to what is free
        rows, what = max(b, LOSS_CHUNK), "one model at a time, KV cache, logits"
        return infer_gpu_needs(params, arch, root, b, n, rows, what)
    act = (ec.batch_size if isinstance(ec.batch_size, int) else 8) * n * arch.vocab * 4
    return [
        Need(
            "RAM",
            "host",
            "one model at a time in fp32",
            4 * P + act + BASE_RAM,
            mem_available(),
            "4·P (fp32, CPU) + batch·(max_seq_length+max_new_tokens)·V·4 logits + 1 GB",
        )
    ]


# Evaluate's rates, measured on one H200 (bench/RESULTS.md, "GPU: evaluate's engines", 2026-12-04): random-weight
# Qwen2.5 7B and 32B through the stage's own code, kmed.lm's CUDA engine (static cache, compiled decode step).
STEP_FIXED_S = 4.2e-3                             # a decode step's cost whatever the model
STEP_WEIGHT_BW = {"bf16": 3.78e12, "nf4": 0.94e12}  # 16-bit weight bytes (2·P) per second of decode step
STEP_KV_S = 3.58e-12                              # seconds per byte of static KV cache (b × cache length)
FORWARD_FLOPS = {"bf16": 5.5e14, "nf4": 4.7e14}   # 2·P·tokens per second of val/MCQ/prefill forwards
COMPILE_S_PER_LAYER = 2.8                         # the decode step compiled twice a model (one shape, then dynamic)
LOAD_BYTES_S = 1e9                                # checkpoint read per second (disk-bound; a guess, not measured)
# Memory bandwidth (B/s) and dense bf16 FLOP/s by the vendors' datasheets: what the H200 rates are scaled by.
CARDS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "H800": (3.35e12, 989e12), "A100": (2.0e12, 312e12),
         "L40S": (0.86e12, 362e12), "RTX 6000 Ada": (0.96e12, 364e12), "A6000": (0.77e12, 155e12),
         "4090": (1.0e12, 165e12), "3090": (0.94e12, 71e12), "L4": (0.3e12, 121e12), "A10": (0.6e12, 125e12)}


def card_rates(name: str) -> tuple[str, float, float]:
    """(the card matched, bandwidth scale, FLOP/s scale) against the H200 the rates were measured on; an unknown
    card gets the H200's rates, said in the name."""
    for key, (bw, fl) in CARDS.items():
        if key.lower() in name.lower():
            return key, bw / CARDS["H200"][0], fl / CARDS["H200"][1]
    return f"{name or 'unknown card'} (unknown: H200 rates)", 1.0, 1.0


def evaluate_eta(arch: Arch, *, models: int, weights: str, batch: int, mcq_tokens: int, val_tokens: int,
                 gen: list[tuple[int, int]], max_new_tokens: int, checkpoint_bytes: int, card: str) -> dict[str, Any]:
    """Seconds of evaluate on `card` (see the module docstring): `gen` lists (prompt tokens, sequences) per
    generation set, sequences = prompts × samples; `weights` is how the models are placed (bf16 or nf4)."""
    name, bw, fl = card_rates(card)
    P, kv = arch.param_count(), kv_bytes(arch)
    fwd_tok_s = FORWARD_FLOPS[weights] * fl / (2 * P)
    parts = {"load": checkpoint_bytes / LOAD_BYTES_S, "compile": COMPILE_S_PER_LAYER * arch.layers,
             "val": val_tokens / fwd_tok_s, "mcq": mcq_tokens / fwd_tok_s, "generation": 0.0}
    for prompt, seqs in gen:
        step = STEP_FIXED_S + 2 * P / (STEP_WEIGHT_BW[weights] * bw) + STEP_KV_S / bw * kv * batch * (prompt + max_new_tokens)
        parts["generation"] += math.ceil(seqs / batch) * (batch * prompt / fwd_tok_s + max_new_tokens * step)
    return {"card": name, "per_model": parts, "total_s": models * sum(parts.values())}


def eta_sentence(eta: dict[str, Any], models: int, weights: str, batch: int, seqs: int, max_new: int) -> str:
    def t(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"

    parts = ", ".join(f"{k} {t(v)}" for k, v in eta["per_model"].items())
    return (f"estimated {t(eta['total_s'])} on {eta['card']}: {models} model(s) × ({parts}); {seqs} generated "
            f"sequences a model of at most {max_new} new tokens, batch {batch}, {weights} weights. Rates measured on "
            "an H200 (bench/RESULTS.md) and scaled to this card; generation is an upper bound (every sequence runs "
            "to max_new_tokens)")


def export_needs(params: Params, arch: Arch, root: Path, planning: bool, cuda: bool) -> list[Need]:
    P, ec = arch.param_count(), params.export
    quants = [q for q in ec.quantizations if q != "f16"]
    peak = int(P * (GGUF_BYTES["f16"] + sum(GGUF_BYTES[q] for q in quants)))  # f16 is written first, always
    kept = peak if "f16" in ec.quantizations else peak - int(2 * P)
    disk = output_disk(root, "models/export", kept, planning=planning)
    disk[0] = (disk[0][0], disk[0][1] + (peak - kept))
    how = "2·P f16 + " + " + ".join(f"{GGUF_BYTES[q]}·P {q}" for q in quants) if quants else "2·P f16"
    if cuda:
        n = max(params.model.max_seq_length + ec.parity_tokens, ec.check_max_tokens)
        what = "merged model (parity reference)"
        mem = infer_gpu_needs(params, arch, root, 1, n, ec.check_max_tokens, what)
    else:
        mem = [Need("RAM", "host", "merged model in fp32 (parity reference)", 4 * P + BASE_RAM, mem_available(),
                    "4·P + 1 GB (freed before llama.cpp's conversion)")]
    ram, conv = next(m for m in mem if m.resource == "RAM"), convert_ram_bytes(arch)
    if conv > (ram.need or 0):  # the reference is gone by then: RAM is the larger of the two phases
        ram.need, ram.what = conv, "converting to GGUF"
        ram.how = "llama.cpp's converter beside the stage: 2 GB + 6 bytes × the largest tensor's elements"
    return mem + disk_needs(disk, root, how)


def convert_ram_bytes(arch: Arch) -> int:
    """Host RAM while llama.cpp's converter writes the f16 GGUF: the stage process (1 GB) and the converter's
    interpreter (1 GB), plus the tensor in flight read as 16-bit and widened to fp32 (6 bytes an element); the
    largest tensor is the embedding (or lm_head) or an MLP matrix. Fitted on the H200 at 7B (bench/RESULTS.md:
    4.82 GiB own memory measured, 4.91 GiB by this)."""
    return 2 * BASE_RAM + 6 * max(arch.vocab * arch.h, arch.inter * arch.h)


def disk_needs(parts: list[tuple[Path, int]], root: Path, how: str) -> list[Need]:
    """One Need per filesystem, summing the parts that land on it."""
    by_dev: dict[int, tuple[Path, list[str], int]] = {}
    for path, n in parts:
        dev = existing(path).stat().st_dev
        first, names, total = by_dev.get(dev, (path, [], 0))
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = str(path)
        by_dev[dev] = (first, [*names, name], total + n)
    return [
        Need("disk", mount_point(p), " and ".join(names), total, free_disk(p), how)
        for p, names, total in by_dev.values()
    ]


def estimate(stage: str, params: Params, root: Path = Path("."), planning: bool = False) -> list[Need]:
    """What `stage` needs and what is free. planning=True (the CLI, before `dvc repro`) also counts DVC's
    unprotect copy of linked persist outputs."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    root = Path(root)
    found = find_config(params, root)
    if found is None:
        return [
            Need(
                "model",
                "-",
                params.model.base,
                None,
                None,
                "cannot estimate yet: no config.json (models/base is written by prepare-base; a Hub model "
                "is read once it is in the local Hugging Face cache)",
            )
        ]
    arch = Arch.from_config(found[0])
    if stage.startswith("sft-"):
        return sft_needs(stage.removeprefix("sft-"), params, arch, root, planning, cuda_available())
    if stage.startswith("merge@"):
        return merge_needs(stage.removeprefix("merge@"), params, arch, root, planning)
    if stage == "evaluate":
        return evaluate_needs(params, arch, root, cuda_available())
    return export_needs(params, arch, root, planning, cuda_available())


# ---------------------------------------------------------------------------------------------
# The check a stage runs, and the CLI
# ---------------------------------------------------------------------------------------------
def size(n: float) -> str:
    return f"{n / GB:.1f} GB" if abs(n) >= GB else f"{n / 10**6:.1f} MB"


def clause(n: Need, headroom: float) -> str:
    want, short = size(math.ceil(n.need * headroom)), size(n.short_by(headroom))  # type: ignore[operator]
    if n.resource == "disk":
        return f"{want} free disk on {n.where} for {n.what} but {size(n.have)} is free ({short} short)"  # type: ignore[arg-type]
    if n.resource == "VRAM":
        return f"{want} free GPU memory on {n.where} but {size(n.have)} is free ({short} short)"  # type: ignore[arg-type]
    return f"{want} RAM but {size(n.have)} is available ({short} short)"  # type: ignore[arg-type]


def shortfall_sentence(stage: str, short: list[Need], headroom: float) -> str:
    vram = {"evaluate": "lower evaluate.batch_size", "export": "free GPU memory"}
    fix = {"disk": "free disk space", "RAM": "free memory",
           "VRAM": vram.get(stage, "lower train.per_device_train_batch_size")}
    fixes = " or ".join(dict.fromkeys(fix[n.resource] for n in short))
    return (
        f"{stage} needs {' and '.join(clause(n, headroom) for n in short)} (estimates × doctor.headroom "
        f"{headroom}); {fixes}, or set doctor.mode: warn in params.yaml to run anyway."
    )


def preflight(stage: str, params: Params, root: str | Path = ".") -> None:
    """Stop the stage (StageError: exit 2, one sentence) before it touches anything if it would run short."""
    cfg = params.doctor
    if cfg.mode == "off":
        return
    needs = estimate(stage, params, Path(root))
    for n in needs:
        log.info(
            "doctor %s: %s %s need %s, free %s (%s)",
            stage,
            n.resource,
            n.where,
            "?" if n.need is None else size(n.need * cfg.headroom),
            "?" if n.have is None else size(n.have),
            n.how,
        )
    short = [n for n in needs if n.short_by(cfg.headroom)]
    if not short:
        return
    msg = shortfall_sentence(stage, short, cfg.headroom)
    if cfg.mode == "fail":
        raise StageError(msg)
    log.warning("%s", msg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmed.doctor", description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", help=f"some of {', '.join(STAGES)} (default: all; sft, merge: both)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    a = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from kmed.config import ParamsError

    try:
        params = load_params(a.params)
    except ParamsError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    wanted: list[str] = []
    for s in a.stages or STAGES:
        group = [x for x in STAGES if x == s or x.startswith((f"{s}-", f"{s}@"))]
        if not group:
            print(f"ERROR: unknown stage {s!r}; one of {', '.join(STAGES)} (or sft, merge).", file=sys.stderr)
            return 2
        wanted += [g for g in group if g not in wanted]
    console = Console()
    console = Console(width=max(console.width, 160))  # the estimate column stays readable in a pipe / CI log
    if find_config(params, Path(".")) is None:
        console.print(f"{params.model.base}: {estimate(wanted[0], params)[0].how}.")
        return 0
    hr, any_short = params.doctor.headroom, False
    for stage in wanted:
        table = Table(title=f"{stage}  (need × headroom {hr})", title_justify="left")
        for col in ("resource", "where", "for", "need", "free", "", "estimate"):
            table.add_column(col)
        for n in estimate(stage, params, Path("."), planning=True):
            short = n.short_by(hr)
            any_short |= bool(short)
            status = (
                "?"
                if n.need is None or n.have is None
                else f"[red]SHORT {size(short)}"
                if short
                else "[green]OK"
            )
            table.add_row(
                n.resource,
                n.where,
                n.what,
                "?" if n.need is None else size(n.need * hr),
                "?" if n.have is None else size(n.have),
                status,
                n.how,
            )
        console.print(table)
    if params.doctor.mode != "fail":
        console.print(f"doctor.mode is {params.doctor.mode}: stages will not stop on a shortfall.")
    return 2 if any_short else 0


if __name__ == "__main__":
    sys.exit(main())
