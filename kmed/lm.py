"""Language-model utilities shared by sft, merge and evaluate: masked tokenization, padded batches,
masked loss, greedy and seeded sampled generation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

IGNORE = -100


def encode_record(tok: Any, prompt: str, completion: str, max_len: int) -> dict[str, list[int]]:
    """input_ids = prompt ⊕ completion; labels are -100 exactly on the prompt (loss on the response,
    EOS included). The prompt gets the tokenizer's BOS if it adds one; the completion never does."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_len]
    labels = ([IGNORE] * len(p) + c)[:max_len]
    return {"input_ids": ids, "labels": labels}


def encode_records(tok: Any, rows: Iterable[dict[str, Any]], max_len: int) -> list[dict[str, list[int]]]:
    rows = list(rows)
    ps = tok([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"] if rows else []
    cs = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    out = []
    for p, c in zip(ps, cs, strict=True):
        out.append({"input_ids": (p + c)[:max_len], "labels": ([IGNORE] * len(p) + c)[:max_len]})
    return out


def padded_batches(
    encoded: list[dict[str, list[int]]], batch_size: int, pad_id: int
) -> Iterator[dict[str, Any]]:
    import torch

    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        n = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        lab = torch.full((len(chunk), n), IGNORE, dtype=torch.long)
        att = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, e in enumerate(chunk):
            k = len(e["input_ids"])
            ids[j, :k] = torch.tensor(e["input_ids"])
            lab[j, :k] = torch.tensor(e["labels"])
            att[j, :k] = 1
        yield {"input_ids": ids, "labels": lab, "attention_mask": att}


def masked_loss(model: Any, encoded: list[dict[str, list[int]]], batch_size: int, pad_id: int,
                chunk: int = 1024) -> dict[str, float]:
    """Token-weighted mean cross-entropy over label tokens, and its perplexity.

    Memory-lean: the vocabulary projection runs only on label positions, `chunk` at a time, so a
    32B val pass never materializes batch x seq x vocab logits (33 GiB at 8 x 2048 x 152k in fp32)."""
    import torch

    was_training = model.training
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = base.model, base.get_output_embeddings()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in padded_batches(encoded, batch_size, pad_id):
            b = {k: v.to(dev) for k, v in b.items()}
            hidden = backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              use_cache=False).last_hidden_state[:, :-1]
            lab = b["labels"][:, 1:]
            mask = lab != IGNORE
            h, y = hidden[mask], lab[mask]
            for i in range(0, len(y), chunk):
                logits = head(h[i : i + chunk]).float()
                total += torch.nn.functional.cross_entropy(logits, y[i : i + chunk], reduction="sum").item()
            count += int(mask.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}


def greedy_generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                    desc: str | None = None) -> list[dict[str, Any]]:
    """Batched greedy decoding with KV cache (left padding). Returns text, token ids and whether EOS
    stopped it, in the order of `prompts`. Prompts are batched by length (shortest first), so a batch
    carries little padding; `desc` shows a progress bar with an ETA."""
    return _generate(model, tok, prompts, max_new_tokens, batch_size, desc, {"do_sample": False, "num_beams": 1})


def sample_generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                    decoding: dict[str, Any], seeds: list[int], desc: str | None = None) -> list[list[dict[str, Any]]]:
    """`len(seeds)` sampled generations per prompt under `decoding` (temperature, top_p): result[i][j] is
    prompt i's sample under seed j. Each sample is one seeded pass over all prompts, so sample j is the
    same whatever the number of samples, and a rerun on the same machine repeats it exactly."""
    import torch

    kw = {"do_sample": True, "temperature": decoding["temperature"], "top_p": decoding["top_p"], "top_k": decoding["top_k"],
          "num_beams": 1}
    per_seed = []
    for j, seed in enumerate(seeds):
        torch.manual_seed(seed)
        d = f"{desc} (sample {j + 1}/{len(seeds)})" if desc else None
        per_seed.append(_generate(model, tok, prompts, max_new_tokens, batch_size, d, kw))
    return [list(row) for row in zip(*per_seed, strict=True)] if per_seed else [[] for _ in prompts]


def _generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str | None,
              kw: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    try:
        for i in tqdm(starts, desc=desc, unit="batch", disable=desc is None, mininterval=5.0):
            idx = order[i : i + batch_size]
            enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=True).to(dev)
            with torch.no_grad():
                # The model's generation_config carries the exported decoding defaults: every knob is explicit here.
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, **kw)
            new = gen[:, enc["input_ids"].shape[1] :]
            for j, row in zip(idx, new.tolist(), strict=True):
                stopped = tok.eos_token_id in row
                ids = row[: row.index(tok.eos_token_id)] if stopped else row
                ids = [t for t in ids if t != tok.pad_token_id]
                out[j] = {"text": tok.decode(ids, skip_special_tokens=True), "ids": ids, "stopped": stopped}
    finally:
        tok.padding_side = old_side
    return [o for o in out if o is not None]
