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

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from kmed.config import Params, load_params, resolved_dict
from kmed.doctor import preflight
from kmed.evaluation import (
    answer_text,
    bleu,
    check_format,
    chrf,
    encode_pair,
    extract_letter,
    is_repetitive,
    kormedmcqa_choice,
    kormedmcqa_cut,
    kormedmcqa_prompt,
    mcq_accuracy,
    mcq_context,
    mcq_question_text,
    regression_keys,
    strata_counts,
    stratified_sample,
    wilson,
)
from kmed.io import StageError, read_jsonl, run_stage, write_json, write_jsonl, write_text_atomic
from kmed.prompt import Prompter
from kmed.tracking import Tracker

log = logging.getLogger("stages.evaluate")
MODEL_DIRS = {"base": Path("models/base"), "stage1": Path("models/stage1/merged"), "stage2": Path("models/stage2/merged")}
TABLE_KEYS = regression_keys()


def mcq_scores(model: Any, tok: Any, prompter: Any, items: list[dict[str, Any]], batch: int,
               share: bool = True) -> list[dict[str, float]]:
    """Log-likelihood of each option letter after the MCQ context (`mcq_context`), scored the way
    lm-evaluation-harness scores a `multiple_choice` task: the cue's trailing space moves into the
    continuation ("정답:" + " A", the tokens the tokenizer writes) and an option's score is the sum
    of its continuation tokens' log-probabilities (`encode_pair`). `share`: see `continuation_logprobs`."""
    requests = []
    unaligned = 0
    for it in items:
        ctx_text = mcq_context(prompter, it)
        conts: dict[str, list[int]] = {}
        ctx: list[int] = []
        for k in it["options"]:
            ctx, conts[k], aligned = encode_pair(tok, ctx_text, k)
            unaligned += not aligned
        requests.append((ctx, conts))
    if unaligned:  # scored as lm-eval does; counted because such a continuation is not what follows the context
        log.warning("mcq: %d option(s) whose context tokens are not a prefix of context + option", unaligned)
    return continuation_logprobs(model, requests, batch, tok.pad_token_id, share=share)


def continuation_logprobs(model: Any, requests: list[tuple[list[int], dict[str, list[int]]]], batch: int,
                          pad: int | None, share: bool = True) -> list[dict[str, float]]:
    """For each (context ids, {key: continuation ids}): the summed log-probability of each continuation
    after the context, fed as context + continuation (lm-eval's `_loglikelihood_tokens`).

    With `share`, continuations that differ only in their last token share one forward pass: every
    option of an item when each is a single token (" A" … " E": one forward per item, read at the last
    context position). Without it, one forward per continuation (the general path; same numbers). Rows
    are batched by length with right padding, and the vocabulary projection runs only on the scored
    positions (the model may be 32B: full-sequence logits would not fit)."""
    import torch
    from tqdm.auto import tqdm

    # Rows: (input ids, first scored position, [(request, key, continuation)]).
    rows: list[tuple[list[int], int, list[tuple[int, str, list[int]]]]] = []
    for r, (ctx, conts) in enumerate(requests):
        groups: dict[tuple[int, ...], list[tuple[int, str, list[int]]]] = {}
        for k, cont in conts.items():
            if not ctx or not cont:
                raise ValueError(f"request {r}, option {k!r}: empty context or continuation")
            groups.setdefault(tuple(cont[:-1]) if share else (k,), []).append((r, k, cont))
        for members in groups.values():
            rows.append(((ctx + members[0][2])[:-1], len(ctx) - 1, members))
    out: list[dict[str, float]] = [{} for _ in requests]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), i))
    dev = next(model.parameters()).device
    backbone, head = model.model, model.get_output_embeddings()
    for i in tqdm(range(0, len(order), batch), desc="mcq", unit="batch", mininterval=5.0):
        idx = order[i : i + batch]
        n = max(len(rows[j][0]) for j in idx)
        x = torch.full((len(idx), n), pad if pad is not None else 0, dtype=torch.long)
        att = torch.zeros((len(idx), n), dtype=torch.long)
        for b, j in enumerate(idx):  # right padding: positions stay those of an unpadded sequence
            x[b, : len(rows[j][0])] = torch.tensor(rows[j][0])
            att[b, : len(rows[j][0])] = 1
        with torch.no_grad():
            hidden = backbone(input_ids=x.to(dev), attention_mask=att.to(dev), use_cache=False).last_hidden_state
            for b, j in enumerate(idx):
                ids, first, members = rows[j]
                lp = torch.log_softmax(head(hidden[b, first : len(ids)]).float(), -1)
                for r, k, cont in members:
                    out[r][k] = sum(lp[t, c].item() for t, c in enumerate(cont))
    return out


def mcq_sample(params: Params, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MCQ items evaluated: seeded by `evaluate.seed`, so a new training seed scores the same items."""
    return stratified_sample(items, params.evaluate.mcq_limit, params.evaluate.seed)


def evaluate_model(name: str, params: Params, sets: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    import torch

    from kmed.data import EN2KO_INSTRUCTION, KO2EN_INSTRUCTION, render_prompt
    from kmed.lm import encode_records, greedy_generate, masked_loss
    from kmed.modeling import autocast_context, load_for_inference, load_tokenizer

    ec, system = params.evaluate, params.data.system_prompt
    folder = MODEL_DIRS[name]
    if not (folder / "config.json").exists():
        raise StageError(f"{folder} is missing; run the earlier stages first (`dvc repro`).")
    t0 = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tok = load_tokenizer(folder)
    model, notes = load_for_inference(folder, trust_remote_code=params.model.trust_remote_code)
    model.eval()
    m: dict[str, float] = {"on_gpu": notes["on_gpu"], "load_4bit": notes["load_4bit"]}
    gens: list[dict[str, Any]] = []
    bs = ec.batch_size
    with autocast_context(model):
        # Loss and perplexity on each stage's val split.
        for i, stage in ((1, "stage1"), (2, "stage2")):
            enc = encode_records(tok, sets[f"val_{stage}"], params.model.max_seq_length)
            if enc:
                r = masked_loss(model, sorted(enc, key=lambda e: len(e["input_ids"])), bs, tok.pad_token_id)
                m[f"val{i}_loss"], m[f"val{i}_ppl"] = r["loss"], r["ppl"]

        # MCQ accuracy by the log-likelihood of the option letters, with its 95 % Wilson interval.
        items = sets["mcq"]
        prompter = Prompter(params.data.prompt_format, system, tok)
        scores = mcq_scores(model, tok, prompter, items, bs)
        hits = round(mcq_accuracy(scores, [it["answer"] for it in items]) * len(items))
        m["mcq_acc"] = hits / max(len(items), 1)
        m["mcq_acc_lo"], m["mcq_acc_hi"] = wilson(hits, len(items))
        m["mcq_n"] = len(items)
        if ec.mcq_generate != "none":  # slower: generate, then extract the letter the model commits to
            if ec.mcq_generate == "r1":  # our prompt: the model reasons in <think>, then answers
                prompts = [prompter.prompt(mcq_question_text(it)) for it in items]
                outs = greedy_generate(model, tok, prompts, ec.max_new_tokens, bs, desc="mcq generate")
                picks = [extract_letter(prompter.as_generated(p, o["text"])) for p, o in zip(prompts, outs, strict=True)]
            else:  # kormedmcqa: lm-eval's task, zero-shot (its 5-shot split is not shipped here)
                outs = greedy_generate(model, tok, [kormedmcqa_prompt(it) for it in items], ec.max_new_tokens, bs,
                                       desc="mcq generate (kormedmcqa)")
                cut = [kormedmcqa_cut(o["text"], tok.eos_token) for o in outs]
                picks = [kormedmcqa_choice(text) for text, _ in cut]
                # lm-eval generates up to 1024 tokens until a stop string; past evaluate.max_new_tokens
                # without one, its pick may differ from ours: the share says how often that was possible.
                unstopped = sum(not (stop or o["stopped"]) for (_, stop), o in zip(cut, outs, strict=True))
                m["mcq_gen_unstopped"] = unstopped / max(len(items), 1)
            gen_hits = sum(p == it["answer"] for p, it in zip(picks, items, strict=True))
            m["mcq_gen_acc"] = gen_hits / max(len(items), 1)
            m["mcq_gen_acc_lo"], m["mcq_gen_acc_hi"] = wilson(gen_hits, len(items))

        # Reasoning format and degenerate repetition on held-out medical questions.
        qs = sets["format_questions"]
        outs = greedy_generate(model, tok, [render_prompt(system, q) for q in qs], ec.max_new_tokens, bs,
                               desc="medical generate")
        fmts = [check_format(o["text"]) for o in outs]
        reps = [is_repetitive(o["text"]) for o in outs]
        if fmts:
            ok = sum(f["ok"] for f in fmts)
            m["format_ok"] = ok / len(fmts)
            m["format_ok_lo"], m["format_ok_hi"] = wilson(ok, len(fmts))
            m["format_n"] = len(fmts)
            m["repetition"] = sum(reps) / len(reps)
            m["think_chars"] = sum(f["think_chars"] for f in fmts) / len(fmts)
            m["eos_stop"] = sum(o["stopped"] for o in outs) / len(outs)
        gens += [{"model": name, "kind": "medical", "prompt": q, "output": o["text"], "format_ok": f["ok"],
                  "repetitive": r, "stopped": o["stopped"]} for q, o, f, r in zip(qs, outs, fmts, reps, strict=True)]

        # Translation, both directions.
        pairs = sets["koen"]
        for direction, instr, src, tgt in (("ko2en", KO2EN_INSTRUCTION, "ko", "en"), ("en2ko", EN2KO_INSTRUCTION, "en", "ko")):
            if not pairs:
                continue
            prompts = [render_prompt(system, f"{instr}\n\n{p[src]}") for p in pairs]
            outs = greedy_generate(model, tok, prompts, ec.max_new_tokens, bs, desc=f"{direction} generate")
            hyps = [answer_text(o["text"]) for o in outs]
            refs = [p[tgt] for p in pairs]
            m[f"chrf_{direction}"] = chrf(hyps, refs)
            m[f"bleu_{direction}"] = bleu(hyps, refs, tgt)
            gens += [{"model": name, "kind": direction, "prompt": p[src], "reference": p[tgt], "output": h}
                     for p, h in zip(pairs[:3], hyps[:3], strict=False)]
    m["seconds"] = round(time.time() - t0, 1)
    if torch.cuda.is_available():
        m["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    gc.collect()  # accelerate's hooks and bnb's quant states hold reference cycles: free them before the next model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return m, gens


def _cell(mm: dict[str, float], k: str) -> str:
    v = mm.get(k)
    if not isinstance(v, float | int):
        return "–"
    lo, hi = mm.get(f"{k}_lo"), mm.get(f"{k}_hi")
    return f"{v:.4g} [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else f"{v:.4g}"


def regression_table(per_model: dict[str, dict[str, float]], mcq: list[dict[str, Any]], mcq_total: int) -> str:
    names = list(per_model)
    lines = ["# Evaluation: base → stage 1 → stage 2", "",
             "| metric | " + " | ".join(names) + " | Δ stage2 vs stage1 |", "|---" * (len(names) + 2) + "|"]
    for k in TABLE_KEYS:
        cells = [_cell(per_model[n], k) for n in names]
        a, b = per_model.get("stage1", {}).get(k), per_model.get("stage2", {}).get(k)
        delta = f"{b - a:+.4g}" if isinstance(a, float | int) and isinstance(b, float | int) else "–"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {delta} |")
    n_fmt = next((int(mm["format_n"]) for mm in per_model.values() if "format_n" in mm), 0)
    strata = ", ".join(f"{k} {v}" for k, v in sorted(strata_counts(mcq).items()))
    lines += ["", "Lower is better for *_loss and repetition; higher for the rest. Brackets: 95 % Wilson interval — "
              "two models whose intervals overlap are not shown to differ. `format_ok`: share of generations with "
              "exactly one well-formed `<think>…</think>` followed by a non-empty answer; `repetition`: share whose "
              "output repeats a line or a 4-gram more than 3 times.", "",
              f"MCQ items: {len(mcq)} of {mcq_total} (seeded sample stratified by subject/file: {strata}). "
              f"Held-out medical prompts generated per model: {n_fmt}.", "",
              "<details><summary>MCQ item ids used</summary>", "", " ".join(it["id"] for it in mcq), "", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    # Config.
    params = load_params()
    preflight("evaluate", params)
    ec = params.evaluate
    sec = {"evaluate": resolved_dict(ec), "model.max_seq_length": params.model.max_seq_length}
    log.info("evaluate: resolved config %s", json.dumps(sec, ensure_ascii=False))
    import torch

    torch.manual_seed(ec.seed)

    # Data: the held-out sets written by preprocess.
    root = Path("data/processed")
    need = [root / "eval/mcq.jsonl", root / "eval/koen.jsonl", root / "stage1/val.jsonl", root / "stage2/val.jsonl"]
    for p in need:
        if not p.exists():
            raise StageError(f"{p} is missing; run `dvc repro preprocess` first.")
    val1, val2 = read_jsonl(need[2]), read_jsonl(need[3])
    all_mcq = read_jsonl(need[0])
    sets = {
        "mcq": mcq_sample(params, all_mcq),
        "koen": read_jsonl(need[1])[: ec.translation_limit],
        "val_stage1": val1[: ec.val_limit], "val_stage2": val2[: ec.val_limit],
        "format_questions": [_question(r["prompt"]) for r in val1][: ec.gen_limit],
    }

    # Models, one at a time (memory), in pipeline order.
    t0 = time.time()
    per_model: dict[str, dict[str, float]] = {}
    generations: list[dict[str, Any]] = []
    for name in ec.models:
        log.info("evaluating %s (%d of %d)", name, len(per_model) + 1, len(ec.models))
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
    write_text_atomic("reports/eval.md", regression_table(per_model, sets["mcq"], len(all_mcq)))
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
