"""Generation engines of kmed.lm: the static cache (the CUDA engine) decodes the same tokens as the dynamic cache,
its fallback, the 4-bit compile switch, and the batch that fits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

PROMPTS = ["### Question:\nA patient has a fever and a cough. What next?\n\n### Response:\n",
           "### Question:\n기침과 발열이 있는 환자의 다음 검사는?\n\n### Response:\n",
           "Translate into English:\n\n두통이 심합니다.", "Hi"]


def _both_engines(model, tok, monkeypatch, fn):  # noqa: ANN001, ANN202
    out = {}
    for engine in ("dynamic", "static"):
        monkeypatch.setenv("KMED_GENERATE_ENGINE", engine)
        out[engine] = fn(model, tok)
    return out["dynamic"], out["static"]


def test_engine_is_static_on_cuda_only_and_can_be_forced(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from kmed.lm import generation_engine

    model = torch.nn.Linear(2, 2)
    monkeypatch.delenv("KMED_GENERATE_ENGINE", raising=False)
    assert generation_engine(model) == "dynamic"  # a CPU model
    monkeypatch.setenv("KMED_GENERATE_ENGINE", "static")
    assert generation_engine(model) == "static"
    monkeypatch.setenv("KMED_GENERATE_ENGINE", "fast")
    with pytest.raises(ValueError, match="KMED_GENERATE_ENGINE"):
        generation_engine(model)


@pytest.mark.integration
def test_static_cache_decodes_the_same_tokens_on_the_embedded_model(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The real SmolLM2-135M (the embedded default's base) in fp32 on the CPU: greedy and seeded sampled tokens
    of the static cache (prompts padded to a multiple of 64) equal the dynamic cache's, prompt by prompt."""
    from kmed.config import ModelCfg
    from kmed.lm import greedy_generate, sample_generate
    from kmed.modeling import load_causal_lm, load_tokenizer, materialize_base

    materialize_base(ModelCfg(), tmp_path / "base")
    tok, model = load_tokenizer(tmp_path / "base"), load_causal_lm(tmp_path / "base")
    greedy = _both_engines(model, tok, monkeypatch, lambda m, t: greedy_generate(m, t, PROMPTS, 24, 3))
    assert [o["ids"] for o in greedy[0]] == [o["ids"] for o in greedy[1]]
    assert all(len(o["ids"]) > 0 for o in greedy[0])
    dec = {"temperature": 0.6, "top_p": 0.95, "top_k": 0}
    sampled = _both_engines(model, tok, monkeypatch, lambda m, t: sample_generate(m, t, PROMPTS, 16, 3, dec, [5, 6]))
    assert [[o["ids"] for o in row] for row in sampled[0]] == [[o["ids"] for o in row] for row in sampled[1]]


@pytest.mark.integration
def test_a_failing_static_cache_falls_back_to_the_dynamic_one(tiny_model_dir: Path, monkeypatch, caplog) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    from kmed.lm import greedy_generate
    from kmed.modeling import load_tokenizer

    tok, model = load_tokenizer(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    monkeypatch.setenv("KMED_GENERATE_ENGINE", "dynamic")
    want = [o["ids"] for o in greedy_generate(model, tok, PROMPTS, 8, 2)]
    real, calls = model.generate, []

    def generate(**kw):  # noqa: ANN003, ANN202
        calls.append(kw.get("cache_implementation"))
        if kw.get("cache_implementation") == "static":
            raise RuntimeError("BackendCompilerFailed: no C compiler")
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setenv("KMED_GENERATE_ENGINE", "static")
    got = [o["ids"] for o in greedy_generate(model, tok, PROMPTS, 8, 2)]
    assert calls == ["static", None, None]  # one failure, then the dynamic cache for this batch and the next
    assert "static-cache generation failed (RuntimeError: BackendCompilerFailed" in caplog.text
    # The fallback batch was padded for the static cache (to 64 tokens); masked pads leave the tokens as they were.
    assert got == want


def test_bitsandbytes_4bit_is_compiled_and_its_quantizer_put_back() -> None:
    from kmed.lm import _compilable

    bnb4 = SimpleNamespace(is_compileable=False, quantization_config=SimpleNamespace(load_in_4bit=True))
    other = SimpleNamespace(is_compileable=False, quantization_config=SimpleNamespace(load_in_4bit=False))
    for q, hidden in ((bnb4, True), (other, False)):
        model = SimpleNamespace(hf_quantizer=q)
        with _compilable(model):
            assert (model.hf_quantizer is None) == hidden
        assert model.hf_quantizer is q


def test_the_batch_that_fits_matches_the_measured_32b_peak() -> None:
    """32B bf16 (64 layers, 8 KV heads of 128, I 27,648, V 152,064), prompts up to 400 tokens + 1,024 new: batch 32
    peaked at 74.7 GiB on an H200 with 61.0 GiB of weights (bench/RESULTS.md)."""
    from kmed.lm import batch_that_fits, seq_bytes

    per = seq_bytes(2 * 64 * 8 * 128 * 2, 27648, 152064, 400, 1024)
    assert 61.0 + 32 * per / 2**30 == pytest.approx(73.5, abs=0.1)
    assert batch_that_fits(int((79.1 - 61.0) * 2**30), per) == 32  # an 80 GB card (79.1 GiB) holds the cap
    assert batch_that_fits(int((23.6 - 18.3) * 2**30), per) == 11  # a 24 GB card, nf4 (18.3 GiB measured)
    assert batch_that_fits(2**30, per) == 1
