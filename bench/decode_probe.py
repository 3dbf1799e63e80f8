"""CPU probe: does a decoding setting fix a model's degenerate outputs? format_ok and repetition (evaluate's own
metric code) of greedy decoding on evaluate's held-out medical prompts, per repetition_penalty.

    python bench/decode_probe.py models/stage1/merged 1.0,1.15

Run in the repo after `dvc repro` (reads params.yaml and data/processed/stage1/val.jsonl). Prints one line per
setting: format_ok, repetition, seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmed.config import load_params  # noqa: E402
from kmed.evaluation import check_format, is_repetitive  # noqa: E402
from kmed.io import read_jsonl  # noqa: E402
from kmed.modeling import load_for_inference, load_tokenizer  # noqa: E402
from kmed.prompt import render_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("penalties", help="comma-separated repetition_penalty values (1.0: plain greedy)")
    a = ap.parse_args()
    import torch

    params = load_params()
    ec = params.evaluate
    qs = [r["question"] for r in read_jsonl("data/processed/stage1/val.jsonl")][: ec.gen_limit]
    tok = load_tokenizer(a.model)
    model, _ = load_for_inference(a.model)
    tok.padding_side = "left"
    prompts = [render_prompt(params.data.system_prompt, q) for q in qs]
    for rp in (float(x) for x in a.penalties.split(",")):
        t0, fmts, reps = time.time(), [], []
        for i in range(0, len(prompts), ec.batch_size):
            enc = tok(prompts[i : i + ec.batch_size], return_tensors="pt", padding=True, add_special_tokens=True)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=ec.max_new_tokens, do_sample=False, repetition_penalty=rp,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                ids = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                text = tok.decode([t for t in ids if t != tok.pad_token_id], skip_special_tokens=True)
                fmts.append(check_format(text)["ok"])
                reps.append(is_repetitive(text))
        print(f"{a.model} repetition_penalty {rp}: format_ok {sum(fmts) / len(fmts):.3f} "
              f"repetition {sum(reps) / len(reps):.3f} ({len(fmts)} prompts, {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
