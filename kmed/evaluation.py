"""Metric code of the evaluate stage, pure and pinned by tests: MCQ scoring, R1 format compliance,
translation chrF/BLEU."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

LETTERS = ("A", "B", "C", "D", "E")
ANSWER_CUE = "정답: "
# The options are scored right after an empty think block: the answer a reasoning model commits to
# when it writes no reasoning (R1's own way to skip it).
EMPTY_THINK = "<think>\n\n</think>\n"
_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def mcq_question_text(item: dict[str, Any]) -> str:
    opts = "\n".join(f"{k}. {v}" for k, v in sorted(item["options"].items()))
    return f"{item['question']}\n\n{opts}"


def mcq_context(prompter: Any, item: dict[str, Any]) -> str:
    """The text each option letter is scored after: the prompt as trained (a `kmed.prompt.Prompter`),
    an empty think block (less what a chat template already opened) and the answer cue."""
    prompt = prompter.prompt(mcq_question_text(item))
    return prompt + prompter.after_prompt(prompt, EMPTY_THINK) + ANSWER_CUE


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int], bool]:
    """Token ids of (context, continuation) as lm-evaluation-harness encodes a causal-LM pair
    (`LM._encode_pair`): trailing whitespace of the context moves into the continuation, then the
    continuation is what tokenizing the whole text adds after the context's tokens.

    A BPE tokenizer never writes "정답: " + "A" (a lone space token, then a bare letter): it writes
    "정답:" + " A". Scoring the former measured tokens of near-zero probability. The third value says
    whether the context's tokens are a prefix of the whole text's (else, like lm-eval, the context's
    own tokens are still the ones fed and the continuation is the whole text's remainder)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=True)["input_ids"]
    ctx = tok(context, add_special_tokens=True)["input_ids"]
    return ctx, whole[len(ctx):], whole[: len(ctx)] == ctx


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


# lm-evaluation-harness's `kormedmcqa` task (lm_eval/tasks/kormedmcqa, v3.0, lm-eval 0.4.13), so that
# `evaluate.mcq_generate: kormedmcqa` can be compared with numbers published with it: its prompt (no
# system text, no chat template, a full-width colon), greedy decoding cut at its stop strings, and its
# answer filter, the cascade of the KorMedMCQA paper's Appendix B.
KORMEDMCQA_UNTIL = ("Q:", "</s>", "<|im_end|>", ".", "\n\n")
_KORMEDMCQA_CHOICE = (
    re.compile(r"정답[:\s]*([ABCDE])", re.I),
    re.compile(r"정답은\s*([ABCDE])\s*입니다", re.I),
    re.compile(r"\b([ABCDE])\.", re.I),
    re.compile(r"\b([ABCDE])\b", re.I),
)


def kormedmcqa_prompt(item: dict[str, Any]) -> str:
    """The task's `doc_to_text`: the question, one `X. option` line per option, then `정답：`."""
    opts = "".join(f"{k}. {v}\n" for k, v in sorted(item["options"].items()))
    return f"{item['question'].strip()}\n{opts}정답："


def kormedmcqa_cut(text: str, eos: str | None) -> tuple[str, bool]:
    """The generation as lm-eval keeps it (cut before the first of each stop string, EOS included),
    and whether a stop string occurred (else lm-eval would have generated on, up to 1024 tokens)."""
    stopped = False
    for term in (*KORMEDMCQA_UNTIL, *([eos] if eos else [])):
        if term in text:
            text, stopped = text.split(term)[0], True
    return text, stopped


def kormedmcqa_choice(text: str) -> str:
    """The task's answer filter (`utils.extract_choice`): the last match of the first pattern that
    matches, upper-cased, or "" (scored wrong)."""
    for pattern in _KORMEDMCQA_CHOICE:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return ""


def check_format(text: str, min_think_tokens: int = 0, count: Callable[[str], int] | None = None) -> dict[str, Any]:
    """R1 output format: exactly one well-formed <think>…</think> first, then a non-empty answer.

    `text` is the generated continuation of a prompt that ends with "### Response:\\n". `wellformed` is that
    shape alone; `reasoned`: it is well-formed and its think block holds at least `min_think_tokens` tokens (by
    `count`, the model's tokenizer; whitespace words without one). `ok` is `wellformed`, and where
    `min_think_tokens` is set (prompts that call for reasoning) `reasoned`: an empty `<think></think>` is
    well-formed but no reasoning."""
    t = text.lstrip()
    opens, closes = t.count("<think>"), t.count("</think>")
    m = _THINK.search(t)
    answer = t[m.end():].strip() if m else ""
    think = m.group(1).strip() if m else ""
    wellformed = opens == 1 and closes == 1 and t.startswith("<think>") and m is not None and bool(answer)
    think_tokens = (count(think) if count else len(think.split())) if think else 0
    reasoned = wellformed and think_tokens >= max(min_think_tokens, 1)
    return {"ok": reasoned if min_think_tokens > 0 else wellformed, "wellformed": wellformed, "reasoned": reasoned,
            "think_chars": len(think), "think_tokens": think_tokens, "answer": answer}


def regression_keys() -> tuple[str, ...]:
    """Metrics of the base → stage 1 → stage 2 regression table, in display order."""
    return ("val1_loss", "val2_loss", "mcq_acc", "format_ok", "reasoning", "repetition", "think_tokens", "eos_stop",
            "chrf_ko2en", "chrf_en2ko", "bleu_ko2en", "bleu_en2ko", "seconds")


def answer_text(text: str) -> str:
    """The part after </think> (or the whole text when there is no think block)."""
    i = text.rfind("</think>")
    return (text[i + len("</think>"):] if i >= 0 else text).strip()


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return chrf_metric().corpus_score(list(hyps), [list(refs)]).score


def bleu(hyps: Sequence[str], refs: Sequence[str], target_lang: str) -> float:
    """BLEU with sacrebleu; Korean targets use character tokenization (no MeCab needed offline)."""
    return bleu_metric(target_lang).corpus_score(list(hyps), [list(refs)]).score


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion hits/n; (0, 1) when n is 0. Unlike the normal
    approximation it stays inside [0, 1] and is honest on small n (24 items at 0.25: 0.12-0.45)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


REPEAT_MAX = 3  # a line or a 4-gram seen more often than this in one output counts as degenerate


def is_repetitive(text: str, max_repeats: int = REPEAT_MAX) -> bool:
    """Degenerate repetition: some non-empty line, or some 4-gram of whitespace tokens, occurs more
    than `max_repeats` times ("<think>\\n<think>\\n<think>…", "새로운 새로운 새로운 …")."""
    lines = Counter(s.strip() for s in text.splitlines() if s.strip())
    if lines and max(lines.values()) > max_repeats:
        return True
    words = text.split()
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) > max_repeats


def stratified_sample(items: Sequence[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """A deterministic sample of `n` items, stratified over (subject, file) in proportion to each
    stratum's size (largest remainder), each stratum ordered by a seeded hash of the item id. The
    whole set, in file order, when n is None or not smaller than the set."""
    if n is None or n >= len(items):
        return list(items)
    strata: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for it in items:
        strata.setdefault((str(it.get("subject", "")), str(it.get("file", ""))), []).append(it)
    quota = {k: n * len(v) / len(items) for k, v in strata.items()}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: (-(quota[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    chosen: set[int] = set()
    for k, members in strata.items():
        ranked = sorted(members, key=lambda it: hashlib.sha256(f"{seed}:{it['id']}".encode()).hexdigest())
        chosen.update(id(it) for it in ranked[: take[k]])
    return [it for it in items if id(it) in chosen]


def strata_counts(items: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Items per subject (or per file where no subject is mapped), for the report."""
    return dict(Counter(str(it.get("subject") or it.get("file") or "all") for it in items))


# --------------------------------------------------------------------------- sampled generations
BOOTSTRAP_REPS = 1000


def _bootstrap(n: int, stat: Any, seed: int, reps: int = BOOTSTRAP_REPS) -> tuple[float, float]:
    """95 % percentile interval of `stat(idx)` over prompts resampled with replacement (seeded)."""
    import numpy as np

    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    vals = np.sort([stat(rng.integers(0, n, n)) for _ in range(reps)])
    return float(vals[int(0.025 * (reps - 1))]), float(vals[int(np.ceil(0.975 * (reps - 1)))])


def sample_mean(values: Sequence[Sequence[float]], seed: int) -> tuple[float, float, float]:
    """Mean over prompts x samples of a per-generation value (values[i][j]: prompt i, sample j), with a
    95 % bootstrap interval over prompts (each resampled prompt keeps its k samples, so the interval
    covers the spread between prompts and, through the per-prompt means, between samples)."""
    import numpy as np

    v = np.asarray(values, dtype=float).reshape(len(values), -1)
    if v.size == 0:
        return 0.0, 0.0, 0.0
    per_prompt = v.mean(1)
    lo, hi = _bootstrap(len(per_prompt), lambda idx: per_prompt[idx].mean(), seed)
    return float(per_prompt.mean()), lo, hi


def corpus_score_samples(hyps: Sequence[Sequence[str]], refs: Sequence[str], metric: Any,
                         seed: int) -> tuple[float, float, float]:
    """A corpus metric (sacrebleu chrF/BLEU) over k samples: the mean over samples of the corpus score
    of sample j (hyps[i][j]: prompt i, sample j), with a 95 % bootstrap interval over prompts. Equal to
    sacrebleu's own corpus_score for each sample (sentence statistics are additive)."""
    import numpy as np

    n = len(refs)
    if n == 0:
        return 0.0, 0.0, 0.0
    k = len(hyps[0])
    stats = [np.asarray(metric._extract_corpus_statistics([h[j] for h in hyps], [list(refs)]), dtype=float)
             for j in range(k)]

    def score(idx: Any) -> float:
        return float(np.mean([metric._compute_score_from_stats(list(s[idx].sum(0))).score for s in stats]))

    lo, hi = _bootstrap(n, score, seed)
    return score(np.arange(n)), lo, hi


def chrf_metric() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


def bleu_metric(target_lang: str) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="char" if target_lang == "ko" else "13a")
