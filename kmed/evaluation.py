"""Metric code of the evaluate stage, pure and pinned by tests: MCQ scoring, R1 format compliance,
translation chrF/BLEU."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

LETTERS = ("A", "B", "C", "D", "E")
ANSWER_CUE = "정답: "
_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def mcq_question_text(item: dict[str, Any]) -> str:
    opts = "\n".join(f"{k}. {v}" for k, v in sorted(item["options"].items()))
    return f"{item['question']}\n\n{opts}"


def mcq_accuracy(scores: Sequence[dict[str, float]], answers: Sequence[str]) -> float:
    """Share of items whose highest-scoring option is the answer letter."""
    if not answers:
        return 0.0
    hits = sum(1 for s, a in zip(scores, answers, strict=True) if max(s, key=s.get) == a)
    return hits / len(answers)


_LETTER = re.compile(r"(?:정답|답|answer)?\s*[:：]?\s*\(?([A-E])\)?(?![A-Za-z])", re.I)


def extract_letter(text: str) -> str | None:
    """The answer letter from a generated answer ("정답: C", "Answer: (B)", "D. ..."), else None."""
    ans = answer_text(text)
    m = re.search(r"(?:정답|답|answer)\s*(?:은|는|:|：)?\s*\(?([A-E])(?![A-Za-z])", ans, re.I) or _LETTER.match(ans)
    return m.group(1).upper() if m else None


def check_format(text: str) -> dict[str, Any]:
    """R1 output format: exactly one well-formed <think>…</think> first, then a non-empty answer.

    `text` is the generated continuation of a prompt that ends with "### Response:\\n"."""
    t = text.lstrip()
    opens, closes = t.count("<think>"), t.count("</think>")
    m = _THINK.search(t)
    answer = t[m.end():].strip() if m else ""
    ok = opens == 1 and closes == 1 and t.startswith("<think>") and m is not None and bool(answer)
    return {"ok": ok, "think_chars": len(m.group(1).strip()) if m else 0, "answer": answer}


def regression_keys() -> tuple[str, ...]:
    """Metrics of the base → stage 1 → stage 2 regression table, in display order."""
    return ("val1_loss", "val2_loss", "mcq_acc", "format_ok", "think_chars", "eos_stop", "chrf_ko2en",
            "chrf_en2ko", "bleu_ko2en", "bleu_en2ko")


def answer_text(text: str) -> str:
    """The part after </think> (or the whole text when there is no think block)."""
    i = text.rfind("</think>")
    return (text[i + len("</think>"):] if i >= 0 else text).strip()


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(list(hyps), [list(refs)]).score


def bleu(hyps: Sequence[str], refs: Sequence[str], target_lang: str) -> float:
    """BLEU with sacrebleu; Korean targets use character tokenization (no MeCab needed offline)."""
    from sacrebleu.metrics import BLEU

    tok = "char" if target_lang == "ko" else "13a"
    return BLEU(tokenize=tok).corpus_score(list(hyps), [list(refs)]).score
