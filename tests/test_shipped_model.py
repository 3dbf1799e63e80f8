"""The model as it ships reasons (issue 39): the exported q4_k_m GGUF of this checkout's `dvc repro`, asked through
llama.cpp's chat completion with the GGUF's own chat template and the decoding defaults it carries (decoding.json),
writes a non-empty `<think>` block on medical questions.

It needs the committed run's export (`make repro`, or `dvc pull` from a remote): a clean clone without it skips
this test (CI does). Export checks the same on every `dvc repro` (`export.min_chat_format_ok` with
`evaluate.min_think_tokens`), so a pipeline that trains the reasoning away fails there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmed.evaluation import check_format

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "models/export"
QUESTIONS = (
    "A 54-year-old man has crushing chest pain for 30 minutes. What is the first test to order?",
    "What is the antidote for acetaminophen overdose?",
    "65세 남성이 갑작스러운 흉통과 식은땀을 호소합니다. 가장 먼저 시행할 검사는?",
)


@pytest.mark.integration
@pytest.mark.skipif(not (EXPORT / "model-q4_k_m.gguf").exists(),
                    reason="no models/export/model-q4_k_m.gguf: run `make repro` (or `dvc pull`) first")
def test_the_exported_q4_k_m_reasons_through_llama_cpp_chat() -> None:
    import yaml

    from kmed.ggufio import isolated

    dec = json.loads((EXPORT / "decoding.json").read_text(encoding="utf-8"))
    min_think = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["min_think_tokens"]
    texts = isolated(_chats, EXPORT / "model-q4_k_m.gguf", dec)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "models/stage2/merged"))
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    fmts = [check_format(t, min_think, count) for t in texts]
    reasoned = sum(f["reasoned"] for f in fmts)
    # Sampled as it ships (T 0.6), so not every answer: at least half of them reason (evaluate measured 0.85 of
    # stage 2's medical answers; the seed's rendering gave none): a <think> of at least evaluate.min_think_tokens.
    assert reasoned >= len(texts) // 2, [t[:120] for t in texts]


def _chats(path: Path, dec: dict) -> list[str]:
    """In llama.cpp's worker process (kmed.ggufio.isolated): 2 seeds x the questions, as a user's client asks."""
    from kmed.ggufio import chat_completion, open_gguf

    llm = open_gguf(path, n_ctx=2048)
    out = []
    for q in QUESTIONS:
        for seed in (0, 1):
            r, _ = chat_completion(llm, [{"role": "user", "content": q}], dec, seed=seed)
            out.append(r["choices"][0]["message"]["content"])
    return out
