"""MCQ scoring: evaluate's `mcq_scores` against lm-evaluation-harness on the same items and prompt (issue 26).

    pip install -e '.[bench]'      # lm-eval, pinned
    python bench/bench_mcq_lmeval.py --root /work/base --models base stage1 stage2

For each model folder (ROOT/models/base, stage1/merged, stage2/merged), on every item of
ROOT/data/processed/eval/mcq.jsonl:
- lm-eval: a `multiple_choice` task built in code (ConfigurableTask, zero-shot, metric `acc`) whose
  doc_to_text is evaluate's MCQ context (`kmed.evaluation.mcq_context`: the prompt of
  `data.prompt_format`, an empty think block and the cue) without its trailing space, the choices the
  item's letters and target_delimiter " ": the requests are ("…정답:", " A"), as lm-eval's own tasks
  write "Answer:" + " A". The model is lm-eval's `HFLM(pretrained=folder, dtype=float32, device=cpu)`.
- ours: `stages.evaluate.mcq_scores` on the folder loaded by `kmed.modeling` in fp32, no autocast
  (bf16 would flip near-ties and blur the comparison).
- old: the pre-fix rule (the bare letter after the cue's trailing-space token), for contrast.
Per model: items, per-item agreement (same argmax letter) of ours and old with lm-eval, the largest
|Δ log p| between ours and lm-eval over all options, the accuracies, and the median probability of
the scored option tokens. One JSON to --out, a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from bench_merge import cpu_info  # noqa: E402

from kmed.config import load_params  # noqa: E402
from kmed.evaluation import mcq_context  # noqa: E402
from kmed.io import read_jsonl  # noqa: E402
from kmed.prompt import Prompter  # noqa: E402

FOLDERS = {"base": "models/base", "stage1": "models/stage1/merged", "stage2": "models/stage2/merged"}
log = logging.getLogger("bench_mcq_lmeval")


def lmeval_scores(folder: Path, contexts: list[str], items: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """lm-eval's log-likelihood of each letter and its own per-item `acc`, in item order."""
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "mcq.jsonl"
        rows = [{"i": i, "context": c.rstrip(), "choices": sorted(it["options"]), "gold": sorted(it["options"]).index(it["answer"])}
                for i, (c, it) in enumerate(zip(contexts, items, strict=True))]
        docs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        task = ConfigurableTask(config={
            "task": "kmed_mcq", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
            "test_split": "test", "output_type": "multiple_choice", "target_delimiter": " ", "num_fewshot": 0,
            "doc_to_text": lambda d: d["context"], "doc_to_choice": lambda d: d["choices"],
            "doc_to_target": lambda d: d["gold"], "metric_list": [{"metric": "acc"}],
        })
        lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch)
        res = simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0)
    out: list[dict[str, Any]] = [{} for _ in items]
    for s in res["samples"]["kmed_mcq"]:
        doc = s["doc"]
        args = [tuple(a) for a in s["arguments"]]
        assert args == [(doc["context"], f" {k}") for k in doc["choices"]], args  # the requests we mean
        out[doc["i"]] = {"scores": {k: r[0] for k, r in zip(doc["choices"], s["filtered_resps"], strict=True)},
                         "acc": float(s["acc"])}
    del lm
    gc.collect()
    return out


def old_scores(model: Any, tok: Any, contexts: list[str], items: list[dict[str, Any]], batch: int) -> list[dict[str, float]]:
    """The pre-fix rule: log-prob of the bare letter token at the last position of "…정답: "."""
    import torch

    letter = {k: tok(k, add_special_tokens=False)["input_ids"][0] for k in "ABCDE"}
    ids = [tok(c, add_special_tokens=True)["input_ids"] for c in contexts]
    out: list[dict[str, float]] = [{} for _ in items]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        n = max(len(ids[j]) for j in idx)
        x = torch.full((len(idx), n), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(idx), n), dtype=torch.long)
        for b, j in enumerate(idx):
            x[b, : len(ids[j])], att[b, : len(ids[j])] = torch.tensor(ids[j]), 1
        with torch.no_grad():
            hidden = model.model(input_ids=x, attention_mask=att, use_cache=False).last_hidden_state
            lp = torch.log_softmax(model.get_output_embeddings()(hidden[torch.arange(len(idx)), att.sum(1) - 1]).float(), -1)
        for b, j in enumerate(idx):
            out[j] = {k: lp[b, letter[k]].item() for k in items[j]["options"]}
    return out


def kormedmcqa_check(folder: Path, items: list[dict[str, Any]], max_gen_toks: int, batch: int) -> dict[str, Any]:
    """evaluate's `mcq_generate: kormedmcqa` path (greedy_generate, then our copy of the task's stop
    strings and answer filter) against lm-eval's own: HFLM.generate_until with the task's
    generation_kwargs from its installed _template_yaml, then its utils.extract_choice. Same token
    budget on both sides (max_gen_toks), fp32, no autocast."""
    import importlib.util

    import torch
    import yaml
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.kormedmcqa.utils import extract_choice

    from kmed.evaluation import kormedmcqa_choice, kormedmcqa_cut, kormedmcqa_prompt
    from kmed.lm import greedy_generate
    from kmed.modeling import load_causal_lm, load_tokenizer

    spec = importlib.util.find_spec("lm_eval")
    assert spec and spec.origin
    raw = (Path(spec.origin).parent / "tasks/kormedmcqa/_template_yaml").read_text(encoding="utf-8")
    gen_kwargs = yaml.safe_load(raw.replace("!function", ""))["generation_kwargs"] | {"max_gen_toks": max_gen_toks}
    prompts = [kormedmcqa_prompt(it) for it in items]
    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch)
    ref = lm.generate_until([Instance("generate_until", it, (p, dict(gen_kwargs)), 0) for p, it in zip(prompts, items, strict=True)])
    ref_picks = [extract_choice(t) for t in ref]
    del lm
    gc.collect()
    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, dtype=torch.float32)
    outs = greedy_generate(model, tok, prompts, max_gen_toks, batch)
    cut = [kormedmcqa_cut(o["text"], tok.eos_token)[0] for o in outs]
    picks = [kormedmcqa_choice(t) for t in cut]
    del model
    gc.collect()
    n = len(items)
    return {"gen_items": n, "gen_max_tokens": max_gen_toks,
            "gen_same_text": sum(a == b for a, b in zip(cut, ref, strict=True)) / n,
            "gen_agree": sum(a == b for a, b in zip(picks, ref_picks, strict=True)) / n,
            "gen_acc_ours": sum(a == it["answer"] for a, it in zip(picks, items, strict=True)) / n,
            "gen_acc_lmeval": sum(a == it["answer"] for a, it in zip(ref_picks, items, strict=True)) / n,
            "gen_per_item": [{"id": it["id"], "ours": a, "lmeval": b} for it, a, b in zip(items, cut, ref, strict=True)]}


def pick(scores: dict[str, float]) -> str:
    return max(scores, key=scores.get)


def measure(name: str, folder: Path, items: list[dict[str, Any]], params: Any, batch: int, with_old: bool) -> dict[str, Any]:
    import torch

    from kmed.modeling import load_causal_lm, load_tokenizer
    from stages.evaluate import mcq_scores

    tok = load_tokenizer(folder)
    prompter = Prompter(params.data.prompt_format, params.data.system_prompt, tok)
    contexts = [mcq_context(prompter, it) for it in items]
    t0 = time.time()
    ref = lmeval_scores(folder, contexts, items, batch)
    t_ref = time.time() - t0
    model = load_causal_lm(folder, dtype=torch.float32)
    model.eval()
    t0 = time.time()
    ours = mcq_scores(model, tok, prompter, items, batch)
    t_ours = time.time() - t0
    old = old_scores(model, tok, contexts, items, batch) if with_old else None
    del model
    gc.collect()
    answers = [it["answer"] for it in items]
    n = len(items)
    row: dict[str, Any] = {
        "model": name, "items": n,
        "agree": sum(pick(o) == pick(r["scores"]) for o, r in zip(ours, ref, strict=True)) / n,
        "max_abs_dlogp": max(abs(o[k] - r["scores"][k]) for o, r in zip(ours, ref, strict=True) for k in o),
        "acc_ours": sum(pick(o) == a for o, a in zip(ours, answers, strict=True)) / n,
        "acc_lmeval": sum(r["acc"] for r in ref) / n,
        "median_p_ours": statistics.median(math.exp(v) for o in ours for v in o.values()),
        "seconds_lmeval": round(t_ref, 1), "seconds_ours": round(t_ours, 1),
    }
    if old is not None:
        row |= {"agree_old": sum(pick(o) == pick(r["scores"]) for o, r in zip(old, ref, strict=True)) / n,
                "acc_old": sum(pick(o) == a for o, a in zip(old, answers, strict=True)) / n,
                "median_p_old": statistics.median(math.exp(v) for o in old for v in o.values())}
    row["per_item"] = [{"id": it["id"], "answer": it["answer"], "ours": o, "lmeval": r["scores"],
                        **({"old": old[i]} if old is not None else {})}
                       for i, (it, o, r) in enumerate(zip(items, ours, ref, strict=True))]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="a repo root with models/ and data/processed/eval/mcq.jsonl")
    ap.add_argument("--models", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for data.system_prompt and data.prompt_format")
    ap.add_argument("--limit", type=int, default=None, help="first N items only (a quick check)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--old", nargs="*", default=list(FOLDERS), choices=list(FOLDERS),
                    help="models also scored by the pre-fix rule (one more pass each)")
    ap.add_argument("--gen-only", action="store_true", help="only the generate check; keep the rows' scoring results")
    ap.add_argument("--gen", type=int, default=0, help="also check the kormedmcqa generate protocol on the first N items")
    ap.add_argument("--gen-tokens", type=int, default=32, help="max new tokens of that check, both sides")
    ap.add_argument("--out", type=Path, default=ROOT / f"bench/results/mcq-lmeval-{datetime.date.today()}.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import lm_eval
    import torch

    params = load_params(a.params)
    items = read_jsonl(a.root / "data/processed/eval/mcq.jsonl")[: a.limit]
    meta = {"lm_eval": lm_eval.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), **cpu_info(),
            "root": str(a.root), "mcq_file": str(a.root / "data/processed/eval/mcq.jsonl")}
    # Rows of earlier runs into the same --out are kept (one run per model as the models appear).
    rows = json.loads(a.out.read_text(encoding="utf-8"))["rows"] if a.out.exists() else []
    for name in a.models:
        log.info("%s: scoring %d items", name, len(items))
        row = measure(name, a.root / FOLDERS[name], items, params, a.batch, name in a.old) if not a.gen_only else {}
        if a.gen:
            old_row = next((r for r in rows if r["model"] == name), {"model": name})
            row = (row or old_row) | kormedmcqa_check(a.root / FOLDERS[name], items[: a.gen], a.gen_tokens, a.batch)
        rows = sorted([r for r in rows if r["model"] != name] + [row], key=lambda r: list(FOLDERS).index(r["model"]))
        log.info("%s: %s", name, {k: v for k, v in row.items() if not k.endswith("per_item")})
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "rows": rows}, ensure_ascii=False, indent=1), encoding="utf-8")
    print("| model | items | agreement | max abs Δlogp | acc ours | acc lm-eval | median p ours | old: agreement | old: acc | old: median p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if "agree" in r):
        print(f"| {r['model']} | {r['items']} | {r['agree']:.3f} | {r['max_abs_dlogp']:.1e} | {r['acc_ours']:.3f} | "
              f"{r['acc_lmeval']:.3f} | {r['median_p_ours']:.2g} | {r.get('agree_old', float('nan')):.3f} | "
              f"{r.get('acc_old', float('nan')):.3f} | {r.get('median_p_old', float('nan')):.2g} |")
    gens = [r for r in rows if "gen_agree" in r]
    if gens:
        print("\n| model | items | max new tokens | same text | same letter | acc ours | acc lm-eval |")
        print("|---|---|---|---|---|---|---|")
        for r in gens:
            print(f"| {r['model']} | {r['gen_items']} | {r['gen_max_tokens']} | {r['gen_same_text']:.3f} | "
                  f"{r['gen_agree']:.3f} | {r['gen_acc_ours']:.3f} | {r['gen_acc_lmeval']:.3f} |")



if __name__ == "__main__":
    main()
