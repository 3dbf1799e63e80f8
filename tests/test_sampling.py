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


@pytest.mark.integration
def test_evaluate_stage_reruns_to_identical_numbers_and_records_its_decoding(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The real evaluate stage, twice, on a tiny model: sampled metrics repeat exactly (seeded), and k, the seeds
    and the decoding are in metrics/eval.json and reports/eval.md; greedy is one decode per prompt."""
    import json
    import shutil

    from tests.stagekit import read_json, run_stage, tiny_records, write_params, write_split

    wd = tmp_path
    for folder in ("models/base", "models/stage1/merged", "models/stage2/merged"):
        shutil.copytree(tiny_model_dir, wd / folder)
    rows = [{**r, "question": r["prompt"].split("### Question:\n")[1].split("\n\n### Response:")[0]}
            for r in tiny_records(8)]
    write_split(wd, "stage1", rows[:4], rows[4:])
    write_split(wd, "stage2", rows[:4], rows[4:])
    mcq = [{"id": f"m{i}", "question": f"질문 {i}?", "options": {k: f"보기 {k}{i}" for k in "ABCDE"},
            "answer": "ABCDE"[i % 5], "subject": "doctor", "file": "x.csv"} for i in range(5)]
    koen = [{"id": f"p{i}", "ko": f"머리가 {i}번 아파요.", "en": f"My head hurt {i} times."} for i in range(3)]
    for name, items in (("mcq", mcq), ("koen", koen)):
        (wd / "data/processed/eval").mkdir(parents=True, exist_ok=True)
        (wd / f"data/processed/eval/{name}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n"
                                                                      for x in items))
    overrides = {"evaluate.gen_limit": 3, "evaluate.translation_limit": 3, "evaluate.max_new_tokens": 6,
                 "evaluate.samples": 3, "evaluate.seed": 11, "evaluate.batch_size": 4, "mlflow.enabled": False}
    write_params(wd, **overrides)
    run_stage(wd, "stages.evaluate")
    first = read_json(wd / "metrics/eval.json")
    gens = (wd / "reports/generations.jsonl").read_text()
    run_stage(wd, "stages.evaluate")
    again = read_json(wd / "metrics/eval.json")
    assert {k: v for k, v in first.items() if "seconds" not in k} == {k: v for k, v in again.items() if "seconds" not in k}
    assert (wd / "reports/generations.jsonl").read_text() == gens
    assert (first["decoding.sampled"], first["decoding.samples"], first["decoding.seed"]) == (1, 3, 11)
    assert (first["decoding.temperature"], first["decoding.top_p"], first["decoding.top_k"]) == (0.6, 0.95, 0)
    for m in ("base", "stage1", "stage2"):
        assert first[f"{m}.format_ok_lo"] <= first[f"{m}.format_ok"] <= first[f"{m}.format_ok_hi"]
        assert first[f"{m}.chrf_ko2en_lo"] <= first[f"{m}.chrf_ko2en"] <= first[f"{m}.chrf_ko2en_hi"]
    assert sum(json.loads(line)["kind"] == "medical" for line in gens.splitlines()) == 3 * 3 * 3  # models x prompts x k
    assert "3 samples per prompt (seeds 11–13), temperature 0.6, top_p 0.95" in (wd / "reports/eval.md").read_text()
    write_params(wd, **overrides, **{"evaluate.decoding": "greedy"})
    run_stage(wd, "stages.evaluate")
    greedy = read_json(wd / "metrics/eval.json")
    assert greedy["decoding.sampled"] == 0 and greedy["decoding.samples"] == 1
    assert "**Decoding: greedy**" in (wd / "reports/eval.md").read_text()
