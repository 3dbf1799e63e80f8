"""Sampled evaluation: seeded samples repeat exactly, and the means and intervals are sacrebleu's own numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmed.evaluation import bleu, bleu_metric, chrf, chrf_metric, corpus_score_samples, sample_mean

REFS = ["The patient has a fever.", "Take the drug twice a day.", "No allergy is known.", "Blood pressure is high."]
HYPS = [["The patient has fever.", "A patient has a fever."], ["Take it twice a day.", "Twice daily."],
        ["No known allergy.", "No allergy is known."], ["BP is high.", "Blood pressure is very high."]]


def test_corpus_scores_are_sacrebleus_per_sample_and_averaged() -> None:
    for metric, plain in ((chrf_metric(), lambda h: chrf(h, REFS)), (bleu_metric("en"), lambda h: bleu(h, REFS, "en"))):
        mean, lo, hi = corpus_score_samples(HYPS, REFS, metric, seed=1)
        per_sample = [plain([h[j] for h in HYPS]) for j in range(2)]
        assert mean == pytest.approx(sum(per_sample) / 2, abs=1e-9)
        assert lo <= mean <= hi and lo < hi


def test_sample_mean_and_its_bootstrap_interval() -> None:
    vals = [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]
    mean, lo, hi = sample_mean(vals, seed=3)
    assert mean == pytest.approx(9 / 16)
    assert 0 <= lo < mean < hi <= 1
    assert sample_mean(vals, seed=3) == (mean, lo, hi)  # seeded: a rerun gives the same interval
    assert sample_mean([[1, 1], [1, 1]], seed=0) == (1.0, 1.0, 1.0)
    # More prompts with the same per-prompt spread narrow the interval.
    _, lo4, hi4 = sample_mean(vals * 4, seed=3)
    assert hi4 - lo4 < hi - lo


@pytest.mark.integration
def test_seeded_samples_repeat_exactly_and_do_not_depend_on_k(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kmed.lm import sample_generate
    from kmed.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["### Question:\nfever?\n\n### Response:\n", "### Question:\n기침?\n\n### Response:\n", "Hi"]
    dec = {"temperature": 1.0, "top_p": 0.95, "top_k": 0}
    a = sample_generate(model, tok, prompts, 12, 2, dec, [7, 8, 9])
    b = sample_generate(model, tok, prompts, 12, 2, dec, [7, 8, 9])
    assert [[o["ids"] for o in row] for row in a] == [[o["ids"] for o in row] for row in b]
    assert len(a) == 3 and all(len(row) == 3 for row in a)
    assert len({tuple(o["ids"]) for o in a[0]}) > 1  # different seeds, different samples (random tiny model)
    # Sample j is drawn under seed j whatever the number of samples.
    c = sample_generate(model, tok, prompts, 12, 2, dec, [7])
    assert [row[0]["ids"] for row in c] == [row[0]["ids"] for row in a]
