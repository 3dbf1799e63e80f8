"""The streaming merge (kmed/merging.py, stages/merge.py) on a tiny Qwen2 built from a config.

The reference everywhere is PEFT itself: the base in fp32 + the adapter through `PeftModel.from_pretrained`,
then `merge_and_unload()`. Adapters are random with a non-zero B (a fresh LoRA's B is zero and would merge
to the base, proving nothing).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kmed.io import StageError
from tests.stagekit import read_json, run_stage, write_params

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int = 0, **lora: Any) -> None:
    """A PEFT LoRA on all 7 projections with random A and B (std 0.05: the delta is ~5-50 % of W here)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kmed.merging import BaseWeights, fp32_model

    model = fp32_model(BaseWeights(base_dir))
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "task_type": "CAUSAL_LM", **lora}
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or (cfg.get("bias") == "all" and name.endswith("bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(out))


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """PEFT's own merge in fp32: the state dict of merge_and_unload()."""
    from peft import PeftModel

    from kmed.merging import BaseWeights, fp32_model

    merged = PeftModel.from_pretrained(fp32_model(BaseWeights(base_dir)), str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def streamed(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    max_shard: str = "2GB",
    save_dtype: str = "bf16",
    probe_max_rel: float = 0.01,
) -> tuple[Any, dict[str, Any]]:
    """kmed.merging's streaming merge into `out`; returns its result and every written tensor."""
    from safetensors.torch import load_file

    from kmed.config import size_bytes
    from kmed.merging import BaseWeights, read_adapter, stream_merge

    base = BaseWeights(base_dir)
    out.mkdir(parents=True)
    res = stream_merge(
        base, read_adapter(adapter_dir, base), out, save_dtype, size_bytes(max_shard), probe_max_rel
    )
    tensors: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return res, tensors


def bf16_ulps(a: Any, b: Any) -> float:
    """max |a - b| in units of the last place (ulp) of bf16 at that value.

    bf16 keeps 8 significant bits, so between 2^e and 2^(e+1) its representable values are 2^(e-7) apart:
    that spacing is 1 ulp. Two bf16 tensors within 1 ulp differ at most by one rounding step anywhere.
    """
    import torch

    a, b = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()
    _, e = torch.frexp(torch.maximum(a.abs(), b.abs()))  # |x| = m * 2^e with 0.5 <= m < 1
    ulp = torch.ldexp(torch.ones_like(a), e - 8)
    return ((a - b).abs() / ulp).max().item()


def sharded_bf16_base(tiny_model_dir: Path, out: Path, max_shard: str = "300KB") -> Path:
    """The tiny model re-saved in bf16 as several shards + model.safetensors.index.json."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size=max_shard)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(f, out / f.name)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    return out


# ---------------------------------------------------------------------------------------------
# (a) the streamed merge is PEFT's merge, tensor for tensor
# ---------------------------------------------------------------------------------------------
CASES = {
    "plain": ({}, "2GB", False),
    "rslora": ({"use_rslora": True, "r": 4, "lora_alpha": 8}, "2GB", False),
    "patterns+bias": (
        {"rank_pattern": {"down_proj": 4}, "alpha_pattern": {"q_proj": 32}, "bias": "all"},
        "2GB",
        False,
    ),
    "sharded": ({}, "50KB", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_equals_peft_merge_and_unload(tiny_model_dir: Path, tmp_path: Path, case: str) -> None:
    lora, max_shard, sharded_base = CASES[case]
    base = sharded_bf16_base(tiny_model_dir, tmp_path / "base") if sharded_base else tiny_model_dir
    make_adapter(base, tmp_path / "adapter", **lora)
    ref = peft_merged(base, tmp_path / "adapter")
    res, got = streamed(base, tmp_path / "adapter", tmp_path / "out", max_shard=max_shard)

    # Tied embeddings stay tied: the base has no lm_head tensor, and neither has the merge.
    assert "lm_head.weight" not in got and set(got) == set(ref) - {"lm_head.weight"}
    assert res.probe_modules == 2 * 7 and res.probe_max_rel_err < 2.0**-8
    for name, t in got.items():
        assert t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16", name
        assert bf16_ulps(t, ref[name]) <= 1.0, name
    # The LoRA moved every target (the test would pass vacuously on a zero delta).
    for name in (n for n in got if n.endswith(".weight") and n.rsplit(".", 2)[-2] in TARGETS):
        w0 = fp32_base_tensor(base, name)
        assert (ref[name] - w0).norm() > 0.05 * w0.norm(), name
    if case == "patterns+bias":  # the adapter's trained biases replace the base's
        assert not (
            got["model.layers.0.self_attn.q_proj.bias"].float()
            == fp32_base_tensor(base, "model.layers.0.self_attn.q_proj.bias").bfloat16().float()
        ).all()

    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    if case == "sharded":
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(got) and sorted(set(index["weight_map"].values())) == files
        assert len(files) == res.shards > 2
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
        for f in files:  # at most max_shard_size, unless one tensor alone is bigger
            from safetensors import safe_open

            with safe_open(str(tmp_path / "out" / f), framework="pt") as sf:
                sizes = [sf.get_slice(k).get_shape() for k in sf.keys()]
            nbytes = sum(2 * _numel(s) for s in sizes)
            assert nbytes <= 50_000 or len(sizes) == 1, (f, nbytes)
    else:
        assert (
            files == ["model.safetensors"]
            and not (tmp_path / "out" / "model.safetensors.index.json").exists()
        )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fp32_base_tensor(base_dir: Path, name: str) -> Any:
    from kmed.merging import BaseWeights

    b = BaseWeights(base_dir)
    return b.load(next(e for e in b.entries if e.name == name)).float()


def test_fp16_save_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    make_adapter(tiny_model_dir, tmp_path / "adapter")
    ref = peft_merged(tiny_model_dir, tmp_path / "adapter")
    res, got = streamed(tiny_model_dir, tmp_path / "adapter", tmp_path / "out", save_dtype="fp16")
    assert all(t.dtype == torch.float16 for t in got.values())
    assert all(torch.equal(t, ref[n].half()) for n, t in got.items())
    assert res.probe_max_rel_err < 2.0**-11


# ---------------------------------------------------------------------------------------------
# (b) the probe check catches a corrupted merge
# ---------------------------------------------------------------------------------------------
CORRUPT = "model.layers.1.mlp.up_proj.weight"


def _flip_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge bug on one module: the sign of its first output row flipped (1 of 128 rows)."""
    import kmed.merging as M

    real = M.merged_weight

    def bad(w: Any, lora: Any) -> Any:
        out = real(w, lora)
        if out.shape == (128, 64) and lora is bad.target:
            out[0].neg_()
        return out

    monkeypatch.setattr(M, "merged_weight", bad)
    bad.target = None  # type: ignore[attr-defined]

    real_read = M.read_adapter

    def read(folder: Any, base: Any) -> Any:
        ad = real_read(folder, base)
        bad.target = ad.loras[CORRUPT]  # type: ignore[attr-defined]
        return ad

    monkeypatch.setattr(M, "read_adapter", read)


def test_probe_catches_a_corrupted_module(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_adapter(tiny_model_dir, tmp_path / "adapter")
    _flip_one_row(monkeypatch)
    with pytest.raises(StageError) as e:
        streamed(tiny_model_dir, tmp_path / "adapter", tmp_path / "out")
    msg = str(e.value)
    assert CORRUPT in msg and "merge.probe_max_rel" in msg and msg.count("\n") == 0 and msg.endswith(".")


def _workdir(tmp_path: Path, base: Path, **overrides: Any) -> Path:
    wd = tmp_path / "wd"
    (wd / "models/stage1").mkdir(parents=True)
    shutil.copytree(base, wd / "models/base")
    make_adapter(wd / "models/base", wd / "models/stage1/adapter")
    write_params(wd, **{"mlflow.enabled": False, **overrides})
    return wd


def _main_in_process(wd: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.merge

    monkeypatch.chdir(wd)
    monkeypatch.setenv("KMED_MLFLOW", "0")
    monkeypatch.setattr(sys, "argv", ["stages.merge", stage])
    stages.merge.main()


@pytest.mark.integration
def test_stage_fails_on_a_corrupted_merge_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parity off, so that the probe alone must catch it (the parity catches it too on a model this small).
    wd = _workdir(tmp_path, tiny_model_dir, **{"merge.parity_max_params_b": 0})
    _flip_one_row(monkeypatch)
    with pytest.raises(StageError) as e:
        _main_in_process(wd, "stage1", monkeypatch)
    msg = str(e.value)
    assert CORRUPT in msg and "nothing written" in msg and msg.count("\n") == 0
    assert not (wd / "models/stage1/merged").exists()
    assert not list((wd / "models/stage1").glob(".merged.*"))
    assert not (wd / "metrics/merge-stage1.json").exists()


# ---------------------------------------------------------------------------------------------
# (c) a base that exists only as a bitsandbytes nf4 checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/build_4bit.py's checkpoint on the tiny shape (untied; NF4 double-quant, as unsloth's bnb-4bit)."""
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import build_4bit
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path_factory.mktemp("nf4") / "base"
    build_4bit.build(build_4bit.SHAPES["tiny"], out)
    return out


def dequantized_reference(nf4_dir: Path, out: Path) -> Path:
    """The 4-bit checkpoint dequantized by another road: transformers' bnb loader builds Linear4bit modules,
    bitsandbytes dequantizes their weights; saved as a plain fp32 model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(str(nf4_dir), device_map="cpu")
    sd = {}
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            sd[f"{name}.weight"] = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    for k, v in q.state_dict().items():
        if k not in sd and not any(k.startswith(w) for w in sd):
            sd[k] = v.float()
    d = AutoConfig.from_pretrained(str(nf4_dir)).to_dict()
    d.pop("quantization_config")
    cfg = type(q.config).from_dict(d)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    plain.save_pretrained(str(out))
    return out


def test_nf4_base_merges_like_dequantize_then_peft(nf4_base: Path, tmp_path: Path) -> None:
    ref_base = dequantized_reference(nf4_base, tmp_path / "deq")
    make_adapter(ref_base, tmp_path / "adapter")
    ref = peft_merged(ref_base, tmp_path / "adapter")
    res, got = streamed(nf4_base, tmp_path / "adapter", tmp_path / "out")
    assert set(got) == set(ref)  # untied: lm_head is there; no .absmax/.quant_map/... companions
    assert res.probe_modules == 14
    for name, t in got.items():
        assert bf16_ulps(t, ref[name]) <= 1.0, name


@pytest.mark.integration
@pytest.mark.parametrize("dequantize", [True, False])
def test_stage_on_a_4bit_base(
    nf4_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dequantize: bool
) -> None:
    wd = _workdir(tmp_path, nf4_base, **{"merge.dequantize_4bit": dequantize, "model.load_in_4bit": False})
    if not dequantize:
        with pytest.raises(StageError) as e:
            _main_in_process(wd, "stage1", monkeypatch)
        assert "merge.dequantize_4bit is false" in str(e.value) and str(e.value).count("\n") == 0
        assert not (wd / "models/stage1/merged").exists()
        return
    _main_in_process(wd, "stage1", monkeypatch)
    m = read_json(wd / "metrics/merge-stage1.json")
    assert m["dequantized_4bit"] == 1 and m["parity_skipped"] == 0 and m["parity_max_abs"] < 1e-3
    lin = read_json(wd / "models/stage1/merged/lineage.json")
    assert lin["dequantized_from_4bit"] is True and lin["lossy_vs_original_16bit"] is True
    assert "lossy" in lin["source_weights"]
    cfg = read_json(wd / "models/stage1/merged/config.json")
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# (d) the stage entry point
# ---------------------------------------------------------------------------------------------
METRIC_KEYS = {
    "parity_max_abs",
    "parity_kl",
    "parity_skipped",
    "probe_max_rel_err",
    "probe_modules",
    "dequantized_4bit",
    "save_dtype_bits",
    "shards",
    "params_b",
    "seconds",
    "size_mb",
    "peak_rss_mb",
}


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.integration
def test_stage_writes_a_loadable_model_whose_logits_match_base_plus_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    wd = _workdir(tmp_path, tiny_model_dir)
    run_stage(wd, "stages.merge", "stage1")
    merged_dir = wd / "models/stage1/merged"
    m = read_json(wd / "metrics/merge-stage1.json")
    assert METRIC_KEYS <= set(m) and m["parity_skipped"] == 0 and m["probe_modules"] == 14
    assert m["parity_max_abs"] < 1e-4 and 0 < m["probe_max_rel_err"] < 2.0**-8 and m["peak_rss_mb"] > 0
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "lineage.json",
        "chat_template.jinja",
    } <= {p.name for p in merged_dir.iterdir()}
    cfg = read_json(merged_dir / "config.json")
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
        str(wd / "models/stage1/adapter"),
    ).eval()
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = _logits(ref, ids), _logits(merged.eval(), ids)
    # Only the bf16 cast of the weights separates them: far below the logits' own spread.
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    assert torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


@pytest.mark.integration
def test_parity_skipped_above_the_budget_says_so(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wd = _workdir(tmp_path, tiny_model_dir, **{"merge.parity_max_params_b": 0.001})
    _main_in_process(wd, "stage1", monkeypatch)
    m = read_json(wd / "metrics/merge-stage1.json")
    assert m["parity_skipped"] == 1 and "merge.parity_max_params_b" in m["parity_skip_reason"]
    assert "parity_max_abs" not in m and m["probe_modules"] == 14
    assert any(r.levelname == "WARNING" and "parity skipped" in r.getMessage() for r in caplog.records)
    assert read_json(wd / "models/stage1/merged/lineage.json")["parity_skipped"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("init", ["merge_then_new_adapter", "continue_adapter"])
def test_stage2_merges_onto_the_base_its_init_mode_names(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str
) -> None:
    wd = _workdir(tmp_path, tiny_model_dir, **{"sft_stage2.init": init})
    _main_in_process(wd, "stage1", monkeypatch)
    make_adapter(wd / "models/base", wd / "models/stage2/adapter", seed=1)
    _main_in_process(wd, "stage2", monkeypatch)
    base = wd / ("models/stage1/merged" if init == "merge_then_new_adapter" else "models/base")
    assert read_json(wd / "models/stage2/merged/lineage.json")["merged_from"] == str(base.relative_to(wd))
    from safetensors.torch import load_file

    ref = peft_merged(base, wd / "models/stage2/adapter")
    got = load_file(str(wd / "models/stage2/merged/model.safetensors"))
    assert all(bf16_ulps(t, ref[n]) <= 1.0 for n, t in got.items())


def test_incomplete_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from kmed.merging import BaseWeights, read_adapter

    make_adapter(tiny_model_dir, tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = {k: v for k, v in load_file(str(f)).items() if ".layers.1.self_attn.v_proj." not in k}
    save_file(sd, str(f))
    with pytest.raises(StageError, match=r"no LoRA for model\.layers\.1\.self_attn\.v_proj\.weight"):
        read_adapter(tmp_path / "adapter", BaseWeights(tiny_model_dir))
