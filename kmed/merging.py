"""Streaming LoRA merge: the base read tensor by tensor, the adapter folded in fp32, shards written as they fill.

Memory stays at about one output shard + the adapter + one weight in fp32, whatever the model size: no
whole model is ever built. Bases: safetensors, one file or sharded (`model.safetensors.index.json`), in any
float dtype, or pre-quantized bitsandbytes 4-bit (nf4/fp4, as `Linear4bit` saves it), dequantized weight by
weight. Each merged module is checked from the written file against base + adapter on fixed random probes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmed.io import StageError

ADAPTER_PREFIX = "base_model.model."
# Companions of a bitsandbytes 4-bit weight `<name>`, stored as `<name>.<suffix>`.
BNB4_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16")
# adapter_config.json settings that change what merging means; the stages never set them.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
)


def torch_dtype(save_dtype: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[save_dtype]


# ---------------------------------------------------------------------------------------------
# Base checkpoint, tensor by tensor
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One logical base tensor: for a 4-bit weight, the dequantized shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name (BF16, F32, ...)
    quantized: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class BaseWeights:
    """A safetensors model folder read one tensor at a time.

    Every read opens the file and closes it again: safetensors maps whole files, and a mapping kept open
    over a 5-10 GB shard would count all of it in the process's RSS once read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        self.config: dict[str, Any] = (
            json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        )
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.file_of: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.folder / "model.safetensors").exists():
            self.file_of = dict.fromkeys(self._keys("model.safetensors"), "model.safetensors")
        else:
            raise StageError(f"{self.folder}: no model.safetensors or model.safetensors.index.json.")
        qc = self.config.get("quantization_config") or {}
        has_bnb4 = any(k.endswith(BNB4_SUFFIXES[-2:]) for k in self.file_of)
        if qc and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
            kind = qc.get("quant_method", "unknown")
            kind += " 8-bit" if qc.get("load_in_8bit") else ""
            raise StageError(
                f"{self.folder}: {kind} quantized weights are not supported (16-bit safetensors or "
                "bitsandbytes 4-bit only)."
            )
        self.quantization = (
            "bitsandbytes-" + str(qc.get("bnb_4bit_quant_type", "nf4")) if (qc or has_bnb4) else None
        )
        if self.quantization:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise StageError(
                    f"{self.folder} holds bitsandbytes 4-bit weights; dequantizing them needs the "
                    "bitsandbytes package."
                ) from None
        self.entries = self._plan()

    def _keys(self, file: str) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self.folder / file), framework="pt") as f:
            return list(f.keys())

    def _plan(self) -> list[Entry]:
        """Logical tensors in file order (4-bit companions folded into their weight)."""
        from safetensors import safe_open

        companions = {f"{k}.{s}" for k in self.file_of for s in BNB4_SUFFIXES if f"{k}.{s}" in self.file_of}
        entries: list[Entry] = []
        for file in sorted(set(self.file_of.values())):
            with safe_open(str(self.folder / file), framework="pt") as f:
                for name in f.keys():
                    if name in companions or self.file_of.get(name) != file:
                        continue
                    state = self._quant_state_key(name)
                    if state is None:
                        sl = f.get_slice(name)
                        if sl.get_dtype() not in _BYTES:
                            raise StageError(
                                f"{self.folder}: tensor {name} has dtype {sl.get_dtype()}, which this "
                                "merge does not read (16/32/64-bit floats, ints, bitsandbytes 4-bit)."
                            )
                        entries.append(Entry(name, tuple(sl.get_shape()), sl.get_dtype()))
                        continue
                    qs = _unpack_quant_state(self._get(state))
                    dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[qs["dtype"]]
                    entries.append(Entry(name, tuple(qs["shape"]), dtype, quantized=True))
        return entries

    def _quant_state_key(self, name: str) -> str | None:
        for s in BNB4_SUFFIXES[-2:]:
            if f"{name}.{s}" in self.file_of:
                return f"{name}.{s}"
        return None

    def _get(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def load(self, entry: Entry) -> Any:
        """The tensor as stored, or for a 4-bit weight, dequantized to its original dtype."""
        if not entry.quantized:
            return self._get(entry.name)
        import bitsandbytes.functional as bnbf
        import torch
        from bitsandbytes.functional import QuantState

        parts = {
            s: self._get(f"{entry.name}.{s}") for s in BNB4_SUFFIXES if f"{entry.name}.{s}" in self.file_of
        }
        qs = QuantState.from_dict(parts, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(self._get(entry.name), qs)

    @property
    def n_params(self) -> int:
        return sum(e.numel for e in self.entries)


def _unpack_quant_state(t: Any) -> dict[str, Any]:
    """The JSON that bitsandbytes packs into `quant_state.bitsandbytes__*` (shape, dtype, blocksize, ...)."""
    return json.loads(bytes(t.numpy().tobytes()).decode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------
@dataclass
class Lora:
    """One module's LoRA: W' = W + (B @ A) * scaling, exactly as PEFT's merge computes it."""

    a: Any  # [r, in]
    b: Any  # [out, r]
    scaling: float

    def delta(self) -> Any:
        return (self.b.float() @ self.a.float()).mul_(self.scaling)

    def apply(self, x: Any) -> Any:
        """scaling * B @ (A @ x), without forming B @ A."""
        return (self.b.float() @ (self.a.float() @ x)) * self.scaling


def merged_weight(w: Any, lora: Lora) -> Any:
    """Add the LoRA delta to an fp32 weight, in place (PEFT's `weight.data += delta`)."""
    return w.add_(lora.delta())


@dataclass
class Adapter:
    loras: dict[str, Lora]  # by base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    replace: dict[str, Any] = field(default_factory=dict)  # trained biases (lora.bias: all / lora_only)
    summary: dict[str, Any] = field(default_factory=dict)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module's dotted name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_adapter(folder: str | Path, base: BaseWeights) -> Adapter:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), mapped onto the base's tensor names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise StageError(
            f"{folder}: a {cfg.get('peft_type')} adapter is not LoRA; only LoRA adapters are merged."
        )
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    if bad:
        raise StageError(f"{folder}: adapter_config.json sets {bad[0]}, which this merge does not handle.")
    r0, alpha0, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    shapes = {e.name: e.shape for e in base.entries}

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    replace: dict[str, Any] = {}
    for key, t in tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise StageError(f"{folder}: adapter tensor {key!r} does not start with {ADAPTER_PREFIX!r}.")
        rest = key[len(ADAPTER_PREFIX) :]
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif rest.endswith(".bias") and "lora_" not in rest:
            name = rest.replace(".base_layer.", ".")
            if shapes.get(name) != tuple(t.shape):
                raise StageError(f"{folder}: adapter bias {key!r} matches no base tensor of that shape.")
            replace[name] = t
        else:
            raise StageError(
                f"{folder}: adapter tensor {key!r} is not a LoRA A/B weight; only LoRA is merged."
            )

    loras: dict[str, Lora] = {}
    for module, ab in sorted(pairs.items()):
        name = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise StageError(f"{folder}: module {module} has lora_{''.join(ab)} but not both A and B.")
        if name not in shapes:
            raise StageError(
                f"{folder}: adapter module {module} has no weight {name!r} in the base {base.folder}."
            )
        a, b = ab["A"], ab["B"]
        rk, ak = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rk]) if rk is not None else r0
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha0
        out_f, in_f = shapes[name][0], shapes[name][-1]
        if a.shape != (r, in_f) or b.shape != (out_f, r) or len(shapes[name]) != 2:
            raise StageError(
                f"{folder}: module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"rank {r} on the base weight {shapes[name]}."
            )
        loras[name] = Lora(a, b, alpha / math.sqrt(r) if rslora else alpha / r)

    # Every base linear named in target_modules must have its LoRA: a short adapter file would otherwise
    # merge silently into part of the model.
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and not any(cfg.get(k) for k in ("layers_to_transform", "exclude_modules")):
        expected = {
            n
            for n, s in shapes.items()
            if len(s) == 2 and n.endswith(".weight") and n.rsplit(".", 2)[-2] in targets
        }
        missing = sorted(expected - set(loras))
        if missing:
            raise StageError(
                f"{folder}: the adapter has no LoRA for {missing[0]} ({len(missing)} target weights "
                "missing); the adapter file is incomplete."
            )
    summary = {
        "r": r0,
        "lora_alpha": alpha0,
        "use_rslora": rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "modules": len(loras),
        "biases_replaced": len(replace),
    }
    return Adapter(loras, replace, summary)


# ---------------------------------------------------------------------------------------------
# The streaming merge
# ---------------------------------------------------------------------------------------------
def out_nbytes(e: Entry) -> int:
    """Bytes once written: float tensors become 16-bit, others keep their dtype."""
    return e.numel * (2 if e.dtype in _FLOATS else _BYTES[e.dtype])


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of at most max_bytes (a single bigger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = out_nbytes(e)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' names: one file is model.safetensors, more are model-0000i-of-0000n + an index."""
    return (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


def probes(name: str, n_in: int, k: int, seed: int) -> Any:
    """k fixed random unit-variance vectors for the module, the same on every run and machine."""
    import zlib

    import torch

    g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.randn(n_in, k, generator=g)


@dataclass
class MergeResult:
    shards: int = 0
    bytes_written: int = 0
    probe_modules: int = 0
    probe_max_rel_err: float = 0.0
    probe_worst_module: str = ""
    tensors: int = 0


def return_freed_memory_at_once() -> None:
    """Have glibc hand every freed block of 1 MiB or more straight back to the OS.

    By default glibc raises its mmap threshold each time a big block is freed, so later tensors of that size
    come from the heap and stay resident after they are freed: on bench/bench_merge.py's 400M model the
    stage's peak RSS then varied 1.0-1.4 GB from run to run, and stayed at 0.84 GB with the threshold pinned.
    A no-op where libc has no mallopt (musl, macOS).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (setting it also turns the dynamic raise off)
    except (OSError, AttributeError):
        pass


def stream_merge(
    base: BaseWeights,
    adapter: Adapter,
    out: Path,
    save_dtype: str,
    max_shard_bytes: int,
    probe_max_rel: float,
    n_probes: int = 4,
    seed: int = 0,
) -> MergeResult:
    """Write base + adapter as `save_dtype` safetensors shards into `out`, one base tensor in memory at a time.

    For each merged module, y_ref = W x + scaling * B (A x) is computed in fp32 from the base weight before
    the merge, and after its shard is written, W' x from the tensor read back from the file; the worst
    relative error over all modules must stay within probe_max_rel, else StageError (the caller's
    atomic_dir then removes what was written).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    return_freed_memory_at_once()
    dtype = torch_dtype(save_dtype)
    plan = plan_shards(base.entries, max_shard_bytes)
    names = shard_names(len(plan))
    res = MergeResult(shards=len(plan))
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(base.entries), unit="tensor", desc="merge", mininterval=2.0)
    with torch.inference_mode():
        for fname, group in zip(names, plan, strict=True):
            tensors: dict[str, Any] = {}
            pending: dict[str, tuple[Any, Any]] = {}
            bar.set_postfix_str(fname)
            for e in group:
                t = base.load(e)
                lora = adapter.loras.get(e.name)
                if lora is not None:
                    w = t.float() if t.dtype != torch.float32 else t
                    del t
                    x = probes(e.name, w.shape[1], n_probes, seed)
                    pending[e.name] = (x, w @ x + lora.apply(x))
                    t = merged_weight(w, lora)
                elif e.name in adapter.replace:
                    t = adapter.replace[e.name]
                tensors[e.name] = t.to(dtype) if t.is_floating_point() else t
                del t
                bar.update(1)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            res.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
            # The probe, on what was written.
            with safe_open(str(out / fname), framework="pt") as f:
                for name, (x, y_ref) in pending.items():
                    y = f.get_tensor(name).float() @ x
                    rel = ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30)).item()
                    res.probe_modules += 1
                    if not math.isfinite(rel) or rel > res.probe_max_rel_err:
                        res.probe_max_rel_err, res.probe_worst_module = rel, name
                    if not math.isfinite(rel) or rel > probe_max_rel:
                        bar.close()
                        raise StageError(
                            f"merged weight {name} fails the probe check (relative error {rel:.3g} against base "
                            f"+ adapter > merge.probe_max_rel {probe_max_rel}); nothing written."
                        )
    bar.close()
    res.tensors = len(weight_map)
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": res.bytes_written},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
    return res


# ---------------------------------------------------------------------------------------------
# The fp32 model for the full-model parity (small models only)
# ---------------------------------------------------------------------------------------------
def fp32_model(base: BaseWeights, trust_remote_code: bool = False) -> Any:
    """The base in fp32 on CPU: transformers' own loader for 16-bit weights; for a 4-bit base, a model
    built from its config (quantization dropped) filled with the dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kmed.modeling import load_causal_lm

    if not base.quantization:
        return load_causal_lm(base.folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    cfg = AutoConfig.from_pretrained(str(base.folder), trust_remote_code=trust_remote_code)
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    cfg = type(cfg).from_dict(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
    sd = model.state_dict()
    with torch.no_grad():
        for e in base.entries:
            sd[e.name].copy_(base.load(e))
    missing = set(sd) - {e.name for e in base.entries}
    if missing - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
        raise StageError(
            f"{base.folder}: the checkpoint lacks {sorted(missing)[0]} that its config's model has."
        )
    return model.eval()


def merge_in_place(model: Any, adapter: Adapter) -> None:
    """The same merge as the stream, on an fp32 model's parameters (for the full-model parity)."""
    import torch

    with torch.no_grad():
        for name, lora in adapter.loras.items():
            merged_weight(model.get_parameter(name).data, lora)
        for name, t in adapter.replace.items():
            model.get_parameter(name).data.copy_(t)
