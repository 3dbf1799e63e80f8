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
    bleu_metric,
    check_format,
    chrf_metric,
    corpus_score_samples,
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
    sample_mean,
    strata_counts,
    stratified_sample,
    wilson,
)
from kmed.io import StageError, read_jsonl, run_stage, write_json, write_jsonl, write_text_atomic
from kmed.prompt import Prompter, decoding
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

    from kmed.data import EN2KO_INSTRUCTION, KO2EN_INSTRUCTION
    from kmed.lm import encode_records, generation_engine, greedy_generate, masked_loss
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
    bs = ec.batch_size if isinstance(ec.batch_size, int) else 4  # val/MCQ forwards: compute-bound at any batch
    log.info("%s: generation engine %s (kmed.lm), evaluate.batch_size %s", name, generation_engine(model),
             ec.batch_size)
    prompter = Prompter(params.data.prompt_format, system, tok)

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    with autocast_context(model):
        # Loss and perplexity on each stage's val split.
        for i, stage in ((1, "stage1"), (2, "stage2")):
            enc = encode_records(tok, sets[f"val_{stage}"], params.model.max_seq_length)
            if enc:
                r = masked_loss(model, sorted(enc, key=lambda e: len(e["input_ids"])), bs, tok.pad_token_id)
                m[f"val{i}_loss"], m[f"val{i}_ppl"] = r["loss"], r["ppl"]

        # MCQ accuracy by the log-likelihood of the option letters, with its 95 % Wilson interval.
        items = sets["mcq"]
        scores = mcq_scores(model, tok, prompter, items, bs)
        hits = round(mcq_accuracy(scores, [it["answer"] for it in items]) * len(items))
        m["mcq_acc"] = hits / max(len(items), 1)
        m["mcq_acc_lo"], m["mcq_acc_hi"] = wilson(hits, len(items))
        m["mcq_n"] = len(items)
        if ec.mcq_generate != "none":  # slower: generate, then extract the letter the model commits to
            if ec.mcq_generate == "r1":  # our prompt: the model reasons in <think>, then answers
                prompts = [prompter.prompt(mcq_question_text(it)) for it in items]
                outs = greedy_generate(model, tok, prompts, ec.max_new_tokens, gen_batch(model, tok, prompts, ec),
                                       desc="mcq generate")
                whole = [prompter.as_generated(p, o["text"]) for p, o in zip(prompts, outs, strict=True)]
                picks = [extract_letter(t) for t in whole]
                m["mcq_gen_reasoning"] = sum(check_format(t, ec.min_think_tokens, count_tokens)["reasoned"]
                                             for t in whole) / max(len(items), 1)
            else:  # kormedmcqa: lm-eval's task, zero-shot (its 5-shot split is not shipped here)
                kp = [kormedmcqa_prompt(it) for it in items]
                outs = greedy_generate(model, tok, kp, ec.max_new_tokens, gen_batch(model, tok, kp, ec),
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

        # Reasoning format and degenerate repetition on held-out medical questions, then translation both
        # ways: `samples` seeded samples per prompt under the decoding defaults (or one greedy decode).
        qs = sets["format_questions"]
        prompts = [prompter.prompt(q) for q in qs]
        outs = generations(model, tok, prompts, ec, sets["decoding"], "medical generate")
        texts = [[prompter.as_generated(p, o["text"]) for o in row] for p, row in zip(prompts, outs, strict=True)]
        # Medical prompts call for reasoning: format_ok needs a think block of evaluate.min_think_tokens tokens.
        fmts = [[check_format(t, ec.min_think_tokens, count_tokens) for t in row] for row in texts]
        reps = [[is_repetitive(t) for t in row] for row in texts]
        if fmts:
            for key, vals in (("format_ok", [[f["ok"] for f in row] for row in fmts]),
                              ("reasoning", [[f["reasoned"] for f in row] for row in fmts]),
                              ("format_wellformed", [[f["wellformed"] for f in row] for row in fmts]),
                              ("repetition", reps), ("eos_stop", [[o["stopped"] for o in row] for row in outs])):
                m[key], m[f"{key}_lo"], m[f"{key}_hi"] = sample_mean(vals, ec.seed)
            m["think_chars"] = sample_mean([[f["think_chars"] for f in row] for row in fmts], ec.seed)[0]
            m["think_tokens"] = sample_mean([[f["think_tokens"] for f in row] for row in fmts], ec.seed)[0]
            m["format_n"] = len(fmts)
        gens += [{"model": name, "kind": "medical", "prompt": q, "sample": j, "output": t, "format_ok": f["ok"],
                  "repetitive": r, "stopped": o["stopped"]}
                 for q, trow, frow, rrow, orow in zip(qs, texts, fmts, reps, outs, strict=True)
                 for j, (t, f, r, o) in enumerate(zip(trow, frow, rrow, orow, strict=True))]

        pairs = sets["koen"]
        for direction, instr, src, tgt in (("ko2en", KO2EN_INSTRUCTION, "ko", "en"), ("en2ko", EN2KO_INSTRUCTION, "en", "ko")):
            if not pairs:
                continue
            prompts = [prompter.prompt(f"{instr}\n\n{p[src]}") for p in pairs]
            hyps = [[answer_text(o["text"]) for o in row] for row in generations(model, tok, prompts, ec, sets["decoding"],
                                                                                f"{direction} generate")]
            refs = [p[tgt] for p in pairs]
            for key, metric in ((f"chrf_{direction}", chrf_metric()), (f"bleu_{direction}", bleu_metric(tgt))):
                m[key], m[f"{key}_lo"], m[f"{key}_hi"] = corpus_score_samples(hyps, refs, metric, ec.seed)
            gens += [{"model": name, "kind": direction, "prompt": p[src], "reference": p[tgt], "sample": 0, "output": h[0]}
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


def regression_table(per_model: dict[str, dict[str, float]], mcq: list[dict[str, Any]], mcq_total: int,
                     dec: dict[str, float], min_think: int) -> str:
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
    if dec["decoding.sampled"]:
        k, s0 = int(dec["decoding.samples"]), int(dec["decoding.seed"])
        how = (f"**Decoding: sampled**, {k} samples per prompt (seeds {s0}–{s0 + k - 1}), temperature "
               f"{dec['decoding.temperature']:g}, top_p {dec['decoding.top_p']:g}, top_k {int(dec['decoding.top_k'])} "
               f"(0: none), at most {int(dec['decoding.max_new_tokens'])} new tokens: the decoding the exported model "
               "carries. Generation metrics are the mean over prompts and samples (chrF/BLEU: the mean of each "
               "sample's corpus score).")
    else:
        how = f"**Decoding: greedy**, one decode per prompt, at most {int(dec['decoding.max_new_tokens'])} new tokens."
    lines += ["", how, "",
              "Lower is better for *_loss and repetition; higher for the rest. Brackets: 95 % intervals — Wilson for "
              "MCQ accuracy, a bootstrap over prompts (1,000 resamples, each prompt with its samples) for the "
              "generation metrics; two models whose intervals overlap are not shown to differ. `reasoning`: share of "
              f"the medical generations whose `<think>` block holds at least {min_think} tokens (evaluate.min_think_tokens); "
              "`format_ok`: share with exactly one well-formed `<think>…</think>` followed by a non-empty answer *and* "
              "that much reasoning (an empty `<think></think>` is no pass on a medical prompt); `think_tokens`: mean "
              "tokens inside `<think>`; `repetition`: share whose output repeats a line or a 4-gram more than 3 times.", "",
              f"MCQ items: {len(mcq)} of {mcq_total} (seeded sample stratified by subject/file: {strata}). "
              f"Held-out medical prompts generated per model: {n_fmt}.", "",
              "<details><summary>MCQ item ids used</summary>", "", " ".join(it["id"] for it in mcq), "", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    # Config.
    params = load_params()
    preflight("evaluate", params)
    ec = params.evaluate
    sec = {"evaluate": resolved_dict(ec), "generate": resolved_dict(params.generate),
           "data.prompt_format": params.data.prompt_format, "model.max_seq_length": params.model.max_seq_length}
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
        "format_questions": [r["question"] for r in val1][: ec.gen_limit],
        "decoding": decoding(params.generate, MODEL_DIRS["base"]),
    }
    dec = sets["decoding"]
    log.info("generations: %s", f"greedy, max_new_tokens {ec.max_new_tokens}" if ec.decoding == "greedy" else
             f"{ec.samples} samples per prompt (seeds {sample_seeds(ec)}), {dec}, max_new_tokens {ec.max_new_tokens}")

    # Models, one at a time (memory), in pipeline order; first, how long that should take here.
    log.info("evaluate: %s", duration_estimate(params, sets))
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
    flat_m.update(decoding_metrics(ec, dec))
    flat_m["seconds"] = round(time.time() - t0, 1)
    write_json("metrics/eval.json", flat_m)
    header = "model," + ",".join(TABLE_KEYS) + "\n"
    rows = "".join(n + "," + ",".join(f"{per_model[n].get(k, '')}" for k in TABLE_KEYS) + "\n" for n in per_model)
    write_text_atomic("metrics/eval-plot.csv", header + rows)
    write_text_atomic("reports/eval.md", regression_table(per_model, sets["mcq"], len(all_mcq), decoding_metrics(ec, dec),
                                                          ec.min_think_tokens))
    write_jsonl("reports/generations.jsonl", generations)
    with Tracker(params.mlflow, "evaluate", resolved_dict(params)) as tr:
        tr.log_metrics(flat_m)
        tr.log_artifact("metrics/eval.json")
        tr.log_artifact("reports/eval.md")
    log.info("evaluate done in %.0fs", flat_m["seconds"])


def generations(model: Any, tok: Any, prompts: list[str], ec: Any, dec: dict[str, Any],
                desc: str) -> list[list[dict[str, Any]]]:
    """Per prompt, its generations: `evaluate.samples` seeded samples, or one greedy decode."""
    from kmed.lm import greedy_generate, sample_generate

    b = gen_batch(model, tok, prompts, ec)
    if ec.decoding == "greedy":
        return [[o] for o in greedy_generate(model, tok, prompts, ec.max_new_tokens, b, desc=desc)]
    return sample_generate(model, tok, prompts, ec.max_new_tokens, b, dec, sample_seeds(ec), desc=desc)


def gen_batch(model: Any, tok: Any, prompts: list[str], ec: Any) -> int:
    """evaluate.batch_size; with `auto`, the largest batch whose KV cache for these prompts fits what the GPU
    has left (kmed.lm.auto_batch_size), logged."""
    from kmed.lm import PAD_MULTIPLE, auto_batch_size

    if isinstance(ec.batch_size, int):
        return ec.batch_size
    longest = max((len(x) for x in tok(prompts, add_special_tokens=True)["input_ids"]), default=0)
    b = auto_batch_size(model, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, ec.max_new_tokens)
    log.info("generation batch %d (auto: prompts up to %d tokens + %d new)", b, longest, ec.max_new_tokens)
    return b


def duration_estimate(params: Params, sets: dict[str, Any]) -> str:
    """Evaluate's expected duration on this GPU from measured rates (kmed.doctor.evaluate_eta), counted on
    the real sets: val and MCQ tokens, generation prompts × samples."""
    import torch

    from kmed.data import EN2KO_INSTRUCTION, KO2EN_INSTRUCTION
    from kmed.doctor import NF4_BYTES, Arch, eta_sentence, evaluate_eta, find_config, kv_bytes
    from kmed.io import gpu_free_planned
    from kmed.lm import PAD_MULTIPLE, batch_that_fits, seq_bytes
    from kmed.modeling import checkpoint_bytes, load_tokenizer, planned_placement

    if not torch.cuda.is_available():
        return "no estimate on the CPU (measured CPU runs: bench/RESULTS.md)"
    ec, found = params.evaluate, find_config(params, Path("."))
    if found is None or not ec.models:
        return "no estimate: no config.json for the model"
    arch, first = Arch.from_config(found[0]), MODEL_DIRS[ec.models[0]]
    tok = load_tokenizer(first)
    prompter = Prompter(params.data.prompt_format, params.data.system_prompt, tok)

    def lens(texts: list[str]) -> list[int]:
        return [len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]] if texts else []

    def padded(texts: list[str]) -> int:
        return -(-max(lens(texts), default=0) // PAD_MULTIPLE) * PAD_MULTIPLE

    val = sum(min(n, params.model.max_seq_length) for n in lens(
        [r["prompt"] + r["completion"] for r in sets["val_stage1"] + sets["val_stage2"]]))
    mcq = sum(lens([prompter.prompt(mcq_question_text(it)) for it in sets["mcq"]]))
    k = ec.samples if ec.decoding == "sampled" else 1
    gen = [(padded([prompter.prompt(q) for q in sets["format_questions"]]), k * len(sets["format_questions"]))]
    gen += [(padded([prompter.prompt(f"{ins}\n\n{p[src]}") for p in sets["koen"]]), k * len(sets["koen"]))
            for ins, src in ((KO2EN_INSTRUCTION, "ko"), (EN2KO_INSTRUCTION, "en")) if sets["koen"]]
    free = gpu_free_planned(torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved())
    weights = planned_placement(first, free)
    P = arch.param_count()
    placed = 2 * P if weights == "bf16" else NF4_BYTES * (P - arch.embedding_params) + 2 * arch.embedding_params
    per_seq = seq_bytes(kv_bytes(arch), arch.inter, arch.vocab, max((g[0] for g in gen), default=0), ec.max_new_tokens)
    b = ec.batch_size if isinstance(ec.batch_size, int) else batch_that_fits(int(free - placed), per_seq)
    eta = evaluate_eta(arch, models=len(ec.models), weights=weights, batch=b, mcq_tokens=mcq, val_tokens=val, gen=gen,
                       max_new_tokens=ec.max_new_tokens, checkpoint_bytes=checkpoint_bytes(first),
                       card=torch.cuda.get_device_name(0))
    return eta_sentence(eta, len(ec.models), weights, b, sum(g[1] for g in gen), ec.max_new_tokens)


def sample_seeds(ec: Any) -> list[int]:
    """Sample j of every prompt is drawn under seed evaluate.seed + j."""
    return [ec.seed + j for j in range(ec.samples)]


def decoding_metrics(ec: Any, dec: dict[str, Any]) -> dict[str, float]:
    """How the generations were decoded, as flat numbers beside the metrics they produced."""
    if ec.decoding == "greedy":
        return {"decoding.sampled": 0, "decoding.samples": 1, "decoding.max_new_tokens": ec.max_new_tokens}
    return {"decoding.sampled": 1, "decoding.samples": ec.samples, "decoding.seed": ec.seed,
            "decoding.temperature": dec["temperature"], "decoding.top_p": dec["top_p"], "decoding.top_k": dec["top_k"],
            "decoding.max_new_tokens": ec.max_new_tokens}


if __name__ == "__main__":
    run_stage(main)
