"""evaluate: score base → stage 1 → stage 2 on the same held-out sets; write the regression table.

    python -m stages.evaluate

Per model: loss/perplexity on each stage's val split; Korean medical MCQ accuracy by the
log-likelihood of the answer letters (deterministic; optional generation with answer extraction);
R1 format compliance of greedy generations (one well-formed <think>…</think> then an answer), mean
think length and share stopped at EOS; chrF and BLEU on Ko→En and En→Ko pairs.
Outputs: metrics/eval.json (flat keys `base.mcq_acc`, `stage1.mcq_acc`, ...), metrics/eval-plot.csv
(dvc plots), reports/eval.md (regression table), reports/generations.jsonl (side-by-side diffs).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kmed.config import Params, load_params, resolved_dict
from kmed.doctor import preflight
from kmed.evaluation import (
    ANSWER_CUE,
    LETTERS,
    answer_text,
    bleu,
    check_format,
    chrf,
    extract_letter,
    mcq_accuracy,
    mcq_question_text,
    regression_keys,
)
from kmed.io import StageError, read_jsonl, run_stage, write_json, write_jsonl, write_text_atomic
from kmed.tracking import Tracker

log = logging.getLogger("stages.evaluate")
MODEL_DIRS = {"base": Path("models/base"), "stage1": Path("models/stage1/merged"), "stage2": Path("models/stage2/merged")}
TABLE_KEYS = regression_keys()


def mcq_scores(model: Any, tok: Any, system: str, items: list[dict[str, Any]], batch: int) -> list[dict[str, float]]:
    """Log-probability of each option letter right after the answer cue (one forward per item)."""
    import torch

    from kmed.data import render_prompt

    letter_ids = {k: tok(k, add_special_tokens=False)["input_ids"][0] for k in LETTERS}
    prompts = [render_prompt(system, mcq_question_text(it)) + f"<think>\n\n</think>\n{ANSWER_CUE}" for it in items]
    out: list[dict[str, float]] = []
    tok.padding_side = "right"
    dev = next(model.parameters()).device
    for i in tqdm(range(0, len(prompts), batch), desc="mcq", leave=False):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            logits = model(**enc).logits.float()
        last = enc["attention_mask"].sum(1) - 1
        lp = torch.log_softmax(logits[torch.arange(len(last)), last], -1)
        for j, it in enumerate(items[i : i + batch]):
            out.append({k: lp[j, letter_ids[k]].item() for k in it["options"]})
    return out


def evaluate_model(name: str, params: Params, sets: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    import torch

    from kmed.data import EN2KO_INSTRUCTION, KO2EN_INSTRUCTION, render_prompt
    from kmed.lm import encode_records, greedy_generate, masked_loss
    from kmed.modeling import load_causal_lm, load_tokenizer

    ec, system = params.evaluate, params.data.system_prompt
    folder = MODEL_DIRS[name]
    if not (folder / "config.json").exists():
        raise StageError(f"{folder} is missing; run the earlier stages first (`dvc repro`).")
    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, dtype=torch.float32, trust_remote_code=params.model.trust_remote_code)
    m: dict[str, float] = {}
    gens: list[dict[str, Any]] = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not torch.cuda.is_available()):
        # Loss and perplexity on each stage's val split.
        for i, stage in ((1, "stage1"), (2, "stage2")):
            enc = encode_records(tok, sets[f"val_{stage}"], params.model.max_seq_length)
            if enc:
                r = masked_loss(model, enc, ec.batch_size, tok.pad_token_id)
                m[f"val{i}_loss"], m[f"val{i}_ppl"] = r["loss"], r["ppl"]

        # MCQ accuracy by answer-letter log-likelihood.
        items = sets["mcq"]
        scores = mcq_scores(model, tok, system, items, ec.batch_size)
        m["mcq_acc"] = mcq_accuracy(scores, [it["answer"] for it in items])
        m["mcq_n"] = len(items)
        if ec.mcq_generate:  # slower: let the model reason, then extract the letter it commits to
            prompts = [render_prompt(system, mcq_question_text(it)) for it in items]
            outs = greedy_generate(model, tok, prompts, ec.max_new_tokens, ec.batch_size)
            m["mcq_gen_acc"] = sum(extract_letter(o["text"]) == it["answer"] for o, it in zip(outs, items, strict=True)) / max(len(items), 1)

        # Reasoning format on held-out medical questions.
        qs = sets["format_questions"]
        outs = greedy_generate(model, tok, [render_prompt(system, q) for q in qs], ec.max_new_tokens, ec.batch_size)
        fmts = [check_format(o["text"]) for o in outs]
        if fmts:
            m["format_ok"] = sum(f["ok"] for f in fmts) / len(fmts)
            m["think_chars"] = sum(f["think_chars"] for f in fmts) / len(fmts)
            m["eos_stop"] = sum(o["stopped"] for o in outs) / len(outs)
        gens += [{"model": name, "kind": "medical", "prompt": q, "output": o["text"], "format_ok": f["ok"],
                  "stopped": o["stopped"]} for q, o, f in zip(qs, outs, fmts, strict=True)]

        # Translation, both directions.
        pairs = sets["koen"]
        for direction, instr, src, tgt in (("ko2en", KO2EN_INSTRUCTION, "ko", "en"), ("en2ko", EN2KO_INSTRUCTION, "en", "ko")):
            if not pairs:
                continue
            prompts = [render_prompt(system, f"{instr}\n\n{p[src]}") for p in pairs]
            outs = greedy_generate(model, tok, prompts, ec.max_new_tokens, ec.batch_size)
            hyps = [answer_text(o["text"]) for o in outs]
            refs = [p[tgt] for p in pairs]
            m[f"chrf_{direction}"] = chrf(hyps, refs)
            m[f"bleu_{direction}"] = bleu(hyps, refs, tgt)
            gens += [{"model": name, "kind": direction, "prompt": p[src], "reference": p[tgt], "output": h}
                     for p, h in zip(pairs[:3], hyps[:3], strict=False)]
    return m, gens


def regression_table(per_model: dict[str, dict[str, float]]) -> str:
    names = list(per_model)
    lines = ["# Evaluation: base → stage 1 → stage 2", "",
             "| metric | " + " | ".join(names) + " | Δ stage2 vs stage1 |", "|---" * (len(names) + 2) + "|"]
    for k in TABLE_KEYS:
        vals = [per_model[n].get(k) for n in names]
        cells = [f"{v:.4g}" if isinstance(v, float | int) else "–" for v in vals]
        a, b = per_model.get("stage1", {}).get(k), per_model.get("stage2", {}).get(k)
        delta = f"{b - a:+.4g}" if isinstance(a, float | int) and isinstance(b, float | int) else "–"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {delta} |")
    lines += ["", "Lower is better for *_loss; higher for the rest. `format_ok`: share of generations with exactly one "
              "well-formed `<think>…</think>` followed by a non-empty answer.", ""]
    return "\n".join(lines)


def main() -> None:
    # Config.
    params = load_params()
    preflight("evaluate", params)
    ec = params.evaluate
    sec = {"evaluate": resolved_dict(ec), "model.max_seq_length": params.model.max_seq_length}
    log.info("evaluate: resolved config %s", json.dumps(sec, ensure_ascii=False))
    import torch

    torch.manual_seed(params.train.seed)

    # Data: the held-out sets written by preprocess.
    root = Path("data/processed")
    need = [root / "eval/mcq.jsonl", root / "eval/koen.jsonl", root / "stage1/val.jsonl", root / "stage2/val.jsonl"]
    for p in need:
        if not p.exists():
            raise StageError(f"{p} is missing; run `dvc repro preprocess` first.")
    val1, val2 = read_jsonl(need[2]), read_jsonl(need[3])
    sets = {
        "mcq": read_jsonl(need[0])[: ec.mcq_limit],
        "koen": read_jsonl(need[1])[: ec.translation_limit],
        "val_stage1": val1[: ec.val_limit], "val_stage2": val2[: ec.val_limit],
        "format_questions": [_question(r["prompt"]) for r in val1][: ec.gen_limit],
    }

    # Models, one at a time (memory), in pipeline order.
    t0 = time.time()
    per_model: dict[str, dict[str, float]] = {}
    generations: list[dict[str, Any]] = []
    for name in ec.models:
        log.info("evaluating %s", name)
        per_model[name], gens = evaluate_model(name, params, sets)
        generations += gens
        log.info("%s: %s", name, {k: round(v, 4) for k, v in per_model[name].items()})

    # Outputs: flat metrics, plot table, regression table, generations.
    flat_m = {f"{n}.{k}": v for n, mm in per_model.items() for k, v in mm.items()}
    flat_m["seconds"] = round(time.time() - t0, 1)
    write_json("metrics/eval.json", flat_m)
    header = "model," + ",".join(TABLE_KEYS) + "\n"
    rows = "".join(n + "," + ",".join(f"{per_model[n].get(k, '')}" for k in TABLE_KEYS) + "\n" for n in per_model)
    write_text_atomic("metrics/eval-plot.csv", header + rows)
    write_text_atomic("reports/eval.md", regression_table(per_model))
    write_jsonl("reports/generations.jsonl", generations)
    with Tracker(params.mlflow, "evaluate", sec) as tr:
        tr.log_metrics(flat_m)
        tr.log_artifact("metrics/eval.json")
        tr.log_artifact("reports/eval.md")
    log.info("evaluate done in %.0fs", flat_m["seconds"])


def _question(prompt: str) -> str:
    """Recover the question from an R1-rendered prompt."""
    q = prompt.split("### Question:\n", 1)[-1]
    return q.rsplit("\n\n### Response:", 1)[0]


if __name__ == "__main__":
    run_stage(main)
