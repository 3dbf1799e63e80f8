"""Metric code of the evaluate stage, pinned on crafted cases."""

from __future__ import annotations

import pytest

from kmed.data import parse_mcq_answer
from kmed.evaluation import (
    answer_text,
    bleu,
    check_format,
    chrf,
    extract_letter,
    is_repetitive,
    mcq_accuracy,
    regression_keys,
    stratified_sample,
    wilson,
)

ITEMS = [
    {"options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "answer": "C"},
    {"options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "answer": "A"},
    {"options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer": "D"},
    {"options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "answer": "E"},
]


def test_oracle_scores_one_and_reversed_scores_zero() -> None:
    answers = [it["answer"] for it in ITEMS]
    oracle = [{k: (1.0 if k == it["answer"] else 0.0) for k in it["options"]} for it in ITEMS]
    reversed_ = [{k: (0.0 if k == it["answer"] else 1.0) + 0.1 * i for i, k in enumerate(it["options"])}
                 for it in ITEMS]
    reversed_ = [{k: (-10.0 if k == it["answer"] else v) for k, v in s.items()} for s, it in zip(reversed_, ITEMS, strict=True)]
    assert mcq_accuracy(oracle, answers) == 1.0
    assert mcq_accuracy(reversed_, answers) == 0.0
    assert mcq_accuracy([], []) == 0.0


@pytest.mark.parametrize(("raw", "letter"), [("C", "C"), ("c", "C"), ("3", "C"), (3, "C"), ("1", "A"), ("5", "E"),
                                             ("E", "E"), (" 2 ", "B")])
def test_letter_and_integer_answers(raw, letter: str) -> None:  # noqa: ANN001
    assert parse_mcq_answer(raw) == letter


@pytest.mark.parametrize("bad", ["6", "0", "F", "", "AB"])
def test_bad_answers_rejected(bad: str) -> None:
    assert parse_mcq_answer(bad) is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>\n환자는 발열이 있다.\n</think>\n정답은 폐렴입니다.", True),
        ("<think>\n\n</think>\nAnswer: B", True),
        ("<think>\nreasoning without end\nAnswer: B", False),          # missing close tag
        ("<think>a</think><think>b</think>answer", False),            # two think blocks
        ("<think>\nreasoning\n</think>\n   ", False),                  # empty answer
        ("Answer first <think>x</think> then", False),                # think not first
        ("plain answer", False),
    ],
)
def test_format_checker(text: str, ok: bool) -> None:
    assert check_format(text)["ok"] is ok


def test_format_checker_measures_think_and_answer() -> None:
    r = check_format("<think>\nabc def\n</think>\n답: A")
    assert r["think_chars"] == len("abc def") and r["answer"] == "답: A"
    assert answer_text("<think>x</think>\n  Paris ") == "Paris"
    assert answer_text("no think") == "no think"


def test_chrf_and_bleu_equal_sacrebleu() -> None:
    from sacrebleu.metrics import BLEU, CHRF

    hyp, ref = ["The patient should take it after meals."], ["Take it after meals, three times a day."]
    assert chrf(hyp, ref) == pytest.approx(CHRF().corpus_score(hyp, [ref]).score)
    assert chrf(ref, ref) == pytest.approx(100.0)
    assert 0 < chrf(hyp, ref) < 100
    assert bleu(ref, ref, "en") == pytest.approx(100.0)
    ko_h, ko_r = ["하루 세 번 식후에 복용하세요."], ["식후 하루 세 번 드세요."]
    assert bleu(ko_h, ko_r, "ko") == pytest.approx(BLEU(tokenize="char").corpus_score(ko_h, [ko_r]).score)


def test_regression_keys_cover_table() -> None:
    assert {"mcq_acc", "format_ok", "chrf_ko2en", "chrf_en2ko", "val1_loss", "val2_loss"} <= set(regression_keys())


@pytest.mark.parametrize(
    ("text", "letter"),
    [("<think>x</think>\n정답: C", "C"), ("<think>x</think>\nAnswer: (b)", "B"), ("<think></think>\nD. 인슐린", "D"),
     ("<think>x</think>\n정답은 E입니다", "E"), ("<think>x</think>\n모르겠습니다", None)],
)
def test_answer_letter_extraction(text: str, letter: str | None) -> None:
    assert extract_letter(text) == letter


def test_wilson_interval_known_values_and_edges() -> None:
    lo, hi = wilson(6, 24)  # 0.25 on 24 items: wide, the reason a ±0.04 change there means nothing
    assert lo == pytest.approx(0.1197, abs=1e-3) and hi == pytest.approx(0.4489, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and 0.0 < wilson(0, 10)[1] < 0.35
    assert wilson(10, 10)[1] == 1.0 and 0.65 < wilson(10, 10)[0] < 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    narrow, wide = wilson(50, 100), wilson(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("<think>\n<think>\n<think>\n<think>\n<think>", True),
        ("새로운 " * 12, True),
        ("the patient has the patient has the patient has the patient has the patient has", True),
        ("<think>\nST elevation in II, III, aVF points to the RCA.\n</think>\nInferior STEMI; avoid nitrates.", False),
        ("<think>\n\n</think>\n하루 세 번 식후에 복용하세요.", False),
        ("a\na\na\nb", False),  # three repeats are allowed, four are not
        ("", False),
    ],
)
def test_is_repetitive(text: str, bad: bool) -> None:
    assert is_repetitive(text) is bad


def test_stratified_sample_is_seeded_proportional_and_in_file_order() -> None:
    items = [{"id": f"d{i}", "subject": "doctor", "file": "a.csv"} for i in range(60)]
    items += [{"id": f"n{i}", "subject": "nurse", "file": "a.csv"} for i in range(30)]
    items += [{"id": f"p{i}", "subject": "pharm", "file": "b.csv"} for i in range(10)]
    got = stratified_sample(items, 20, seed=3407)
    assert len(got) == 20
    by = {s: sum(it["subject"] == s for it in got) for s in ("doctor", "nurse", "pharm")}
    assert by == {"doctor": 12, "nurse": 6, "pharm": 2}  # proportional, not the first 20 rows (all doctor)
    assert got == stratified_sample(items, 20, seed=3407)  # deterministic
    assert got != stratified_sample(items, 20, seed=1)  # the seed matters
    pos = [items.index(it) for it in got]
    assert pos == sorted(pos)  # file order kept
    assert stratified_sample(items, None, seed=3407) == items
    assert stratified_sample(items, 500, seed=3407) == items


def test_an_empty_think_is_well_formed_but_not_reasoning() -> None:
    """Issue 39: on a prompt that calls for reasoning, format_ok needs `min_think_tokens` inside <think>."""
    empty = "<think>\n\n</think>\nAnswer: B"
    short = "<think>\nfever so flu\n</think>\nAnswer: B"
    long = "<think>\n" + " ".join(["step"] * 20) + "\n</think>\nAnswer: B"
    assert check_format(empty)["ok"] and check_format(empty)["wellformed"]  # translation prompts: today's rule
    r = check_format(empty, min_think_tokens=16)
    assert (r["ok"], r["wellformed"], r["reasoned"], r["think_tokens"]) == (False, True, False, 0)
    assert check_format(short, 16)["think_tokens"] == 3 and not check_format(short, 16)["ok"]
    assert check_format(long, 16)["ok"] and check_format(long, 16)["reasoned"]
    # the bar counts tokens of the tokenizer it is given (here: characters)
    assert check_format(short, 10, count=len)["think_tokens"] == len("fever so flu") and check_format(short, 10, len)["ok"]
    # reasoning inside a malformed answer is not a pass either
    assert not check_format("<think>\n" + " ".join(["x"] * 30) + "\n</think>\n", 16)["reasoned"]
