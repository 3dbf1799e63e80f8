"""Base materialization: faithful GGUF tokenizer, safetensors-only loading, the Hub path offline."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from kmed.config import ModelCfg
from kmed.io import StageError
from kmed.modeling import embedded_gguf, hub_snapshot, materialize_base, refuse_pickles, refuse_unsafe_model

TEXTS = [
    "65세 남성이 갑작스러운 흉통과 식은땀을 호소합니다. 심전도에서 ST 분절 상승이 보입니다.",
    "The patient is a 45-year-old man with chest pain radiating to the left arm (BP 150/95).",
    "def dose(kg: float) -> float:\n    return 15 * kg  # 아세트아미노펜 mg\n\n\tprint('ok')",
    "<|im_start|>user\n혈압약은 언제 먹나요?<|im_end|>\n<|im_start|>assistant\n",
    "숫자 1234567 와 공백   여러 개, emoji 🙂 and ümlauts.",
]


def test_tokenizer_matches_the_gguf_vocabulary(smol_tokenizer) -> None:  # noqa: ANN001
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ours = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ours == theirs, text
            assert smol_tokenizer.decode(ours) == text
    finally:
        llm.close()
    assert smol_tokenizer.eos_token == "<|im_end|>" and smol_tokenizer.pad_token is not None
    assert smol_tokenizer.bos_token == "<|im_start|>"
    assert "<|im_start|>" in (smol_tokenizer.chat_template or "")


@pytest.fixture(scope="module")
def embedded_base(tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("base")
    materialize_base(ModelCfg(), out)
    return out


@pytest.mark.integration
def test_materialized_base_is_complete_and_stops_at_im_end(embedded_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in embedded_base.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    tok = AutoTokenizer.from_pretrained(embedded_base)
    model = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tok.eos_token_id in out.tolist(), "generation must stop at <|im_end|>"
    assert "Paris" in tok.decode(out, skip_special_tokens=True)


def test_pickle_weights_refused_and_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(StageError, match="refusing pickle weights 'pytorch_model.bin'"):
        refuse_pickles(tmp_path)
    with pytest.raises(StageError, match="refusing pickle"):
        materialize_base(ModelCfg(base=str(tmp_path)), tmp_path / "out")
    assert not marker.exists()


def test_custom_code_refused_unless_trusted(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoModelForCausalLM": "m.X"}}')
    with pytest.raises(StageError, match=r"needs custom code \(auto_map\) and model.trust_remote_code is false"):
        refuse_unsafe_model(tmp_path)
    refuse_unsafe_model(tmp_path, trust_remote_code=True)  # allowed (config.py checks the allow-list)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    refuse_unsafe_model(tmp_path)


def test_hub_path_resolves_a_pinned_snapshot_offline(tmp_path: Path, monkeypatch, tiny_model_dir: Path) -> None:  # noqa: ANN001
    """The real huggingface_hub code, against a local cache laid out as the Hub writes it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--acme--tiny-med" / "snapshots" / sha
    snap.mkdir(parents=True)
    for p in tiny_model_dir.iterdir():
        (snap / p.name).write_bytes(p.read_bytes())
    (tmp_path / "hub" / "models--acme--tiny-med" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-med" / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert hub_snapshot("acme/tiny-med", sha) == snap
    out = tmp_path / "base"
    out.mkdir()
    info = materialize_base(ModelCfg(base="acme/tiny-med", revision=sha), out)
    assert info["source"] == "hub" and (out / "model.safetensors").exists()
    with pytest.raises(StageError, match="could not fetch from the Hub"):
        hub_snapshot("acme/tiny-med", "f" * 40)
