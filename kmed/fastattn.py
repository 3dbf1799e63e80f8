"""Packed (padding-free) attention for Unsloth on torch 2.11.

Unsloth 2026.10.9 runs packed rows through torch's flash varlen kernel only when
`torch.nn.attention.varlen.varlen_attn` takes `enable_gqa` (torch >= 2.12). On torch 2.11 — the
GPU image this repo is measured on, and a common pin — it falls back to one SDPA call per packed
segment per layer, which made packing slower than padding (bench/RESULTS.md, call C: 0.63x).
torch 2.11 already ships the flash varlen kernels (`aten._flash_attention_forward/_backward`, which
take grouped-query K/V natively); `enable_unsloth_varlen` hands them to Unsloth's dispatcher
through the one hook it reads at call time (`attention_dispatch._TORCH_VARLEN_ATTN`).

It changes nothing when Unsloth already found a varlen kernel, when the module layout differs
(another Unsloth version), without CUDA flash attention, or with `KMED_UNSLOTH_VARLEN=0`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def flash_varlen(q: Any, k: Any, v: Any, cu_seqlens: Any, max_seqlen: int, *, causal: bool = True,
                 scale: float | None = None, window: tuple[int, int] = (-1, -1)) -> Any:
    """Flash attention over packed segments: q (T, Hq, D), k/v (T, Hkv, D) with Hq % Hkv == 0,
    `cu_seqlens` int32 (N+1,) on the same device. Returns (T, Hq, D)."""
    return _FlashVarlen.apply(q, k, v, cu_seqlens, int(max_seqlen), causal, scale, window[0], window[1])


def _make_function() -> Any:
    import torch

    class FlashVarlen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu, max_len, causal, scale, left, right):  # noqa: ANN001, ANN205
            out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_len, max_len, 0.0, causal, return_debug_mask=False, scale=scale,
                window_size_left=left, window_size_right=right,
            )
            ctx.save_for_backward(q, k, v, cu, out, lse, seed, offset)
            ctx.args = (max_len, causal, scale, left, right)
            return out

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            q, k, v, cu, out, lse, seed, offset = ctx.saved_tensors
            max_len, causal, scale, left, right = ctx.args
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                grad.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, causal, seed, offset,
                scale=scale, window_size_left=left, window_size_right=right,
            )
            return dq, dk, dv, None, None, None, None, None, None

    return FlashVarlen


class _Lazy:
    fn: Any = None

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if cls.fn is None:
            cls.fn = _make_function()
        return cls.fn.apply(*args)


_FlashVarlen = _Lazy


def _unsloth_hook(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int, *,
                  scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                  enable_gqa: bool = False) -> Any:
    """`varlen_attn`'s signature as Unsloth calls it (same cu_seqlens for q and k: self-attention)."""
    if cu_seq_q is not cu_seq_k or max_q != max_k:
        raise ValueError("kmed.fastattn: only self-attention over one set of packed segments is supported")
    left, right = window_size
    return flash_varlen(query, key, value, cu_seq_q, max_q, causal=right == 0, scale=scale, window=(left, right))


def enable_unsloth_varlen() -> str | None:
    """Call after `import unsloth`. Returns what was enabled (for the stage's notes), or None."""
    if os.environ.get("KMED_UNSLOTH_VARLEN", "1").lower() in ("0", "false", "no", "off"):
        return None
    try:
        import torch
        from unsloth.utils import attention_dispatch as ad
    except Exception:  # not installed / another layout
        return None
    if not hasattr(ad, "_TORCH_VARLEN_ATTN") or ad._TORCH_VARLEN_ATTN is not None:
        return None  # unknown layout, or Unsloth already has a varlen kernel
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return None
    if not torch.backends.cuda.is_flash_attention_available():
        return None
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return None
    ad._TORCH_VARLEN_ATTN = _unsloth_hook
    log.info("packed rows: Unsloth's attention dispatcher uses torch's flash varlen kernels "
             "(kmed.fastattn; KMED_UNSLOTH_VARLEN=0 turns this off)")
    return "flash varlen (aten, kmed.fastattn)"


def unsloth_packed_kernel() -> bool:
    """True when Unsloth runs padding-free (packed) rows on a varlen flash kernel: the flash-attn package,
    torch's own `varlen_attn` (torch >= 2.12) or ours (`enable_unsloth_varlen`). Without one it falls back
    to one SDPA call per segment per layer, and padded batches are faster (bench/RESULTS.md, call C)."""
    try:
        import torch
        from unsloth.utils import attention_dispatch as ad
    except Exception:  # not installed / another layout
        return False
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False  # Unsloth's flash paths need sm80+ (it falls back to SDPA below)
    return bool(getattr(ad, "HAS_FLASH_ATTENTION", False)) or getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None
