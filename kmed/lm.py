"""Language-model utilities shared by sft, merge and evaluate: masked tokenization, padded batches,
masked loss, greedy and seeded sampled generation.

Generation engine (`generation_engine`): on CUDA, a static KV cache, whose decode step transformers
compiles with CUDA graphs (torch.compile mode reduce-overhead); elsewhere transformers' dynamic cache,
eager. Measured on an H200 (bench/RESULTS.md, random-weight Qwen2.5 shapes): a 32B bf16 decode step at
batch 32 takes 31 ms compiled against 67-127 ms eager, where the eager step is per-layer Python and
kernel-launch overhead, not the GPU; nf4 at batch 8 takes 76 ms against 178 ms. The tokens are the same
computation (same weights, same masked attention), in other kernels: equal in exact arithmetic, and equal
greedy tokens on the CPU (tests/test_lm.py), where both engines run in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

IGNORE = -100
# Static-cache prompts are left-padded to a multiple of this, so that a few cache lengths (compiled shapes)
# serve every batch of an evaluation.
PAD_MULTIPLE = 64
MAX_AUTO_BATCH = 32  # the largest batch measured (bench/RESULTS.md): 32B bf16 at 2,048+1,024 tokens fits 80 GB
log = logging.getLogger("kmed.lm")


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
                    desc: str | None = None, engine: str | None = None) -> list[dict[str, Any]]:
    """Batched greedy decoding with KV cache (left padding). Returns text, token ids and whether EOS
    stopped it, in the order of `prompts`. Prompts are batched by length (shortest first), so a batch
    carries little padding; `desc` shows a progress bar with an ETA. `engine` overrides
    `generation_engine` (e.g. `dynamic` for a few short decodes, where compiling costs more than it saves)."""
    return _generate(model, tok, prompts, max_new_tokens, batch_size, desc, {"do_sample": False, "num_beams": 1},
                     engine)


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


def generation_engine(model: Any) -> str:
    """`static` (static KV cache, decode step compiled) on CUDA, `dynamic` (transformers' default cache, eager)
    elsewhere. KMED_GENERATE_ENGINE=static|dynamic overrides it (a machine fact, like KMED_GPU_MEM_GB: e.g. a
    host without a C compiler for torch.compile)."""
    env = os.environ.get("KMED_GENERATE_ENGINE", "auto")
    if env not in ("auto", "static", "dynamic"):
        raise ValueError(f"KMED_GENERATE_ENGINE={env!r}: use auto, static or dynamic")
    if env != "auto":
        return env
    return "static" if next(model.parameters()).device.type == "cuda" else "dynamic"


def seq_bytes(kv_per_token: int, intermediate: int, vocab: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """GPU bytes one generated sequence adds: K and V of every layer for prompt + new tokens in 16 bits, the
    MLP's prefill activations (4 bytes a prompt token and intermediate unit), two fp32 rows of logits."""
    return kv_per_token * (prompt_tokens + max_new_tokens) + 4 * prompt_tokens * intermediate + 8 * vocab


def batch_that_fits(free: int, per_seq: int, cap: int = MAX_AUTO_BATCH) -> int:
    """Sequences of `per_seq` bytes that fit `free` GPU bytes with 1 GiB kept free, between 1 and `cap`.
    Measured: 32B bf16, batch 32, prompts up to 400 tokens + 1,024 new peaked at 74.7 GiB on an H200 with
    61.0 GiB of weights; seq_bytes gives 61.0 + 12.5, + the 1 GiB kept free = 74.5."""
    return max(1, min(cap, int((free - 2**30) // per_seq)))


def auto_batch_size(model: Any, prompt_tokens: int, max_new_tokens: int, cap: int = MAX_AUTO_BATCH) -> int:
    """The largest generation batch that fits the GPU memory left after the model is placed (8 on the CPU)."""
    import torch

    if next(model.parameters()).device.type != "cuda":
        return 8
    from kmed.io import gpu_free_planned

    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    free = gpu_free_planned(torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved())
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached by torch, free to reuse
    return batch_that_fits(free, seq_bytes(kv, c.intermediate_size, c.vocab_size, prompt_tokens, max_new_tokens), cap)


@contextlib.contextmanager
def _compilable(model: Any) -> Iterator[None]:
    """transformers compiles a static cache's decode step unless the model's quantizer declares it cannot be
    compiled, which bitsandbytes' 4-bit quantizer does (`is_compileable` False) although its kernels are torch
    custom ops that compile and run: nf4 32B at batch 8 decoded in 76 ms a step compiled against 178 ms eager
    (H200, bench/RESULTS.md). The quantizer is hidden for the call and put back after."""
    q = getattr(model, "hf_quantizer", None)
    hide = q is not None and not q.is_compileable and bool(getattr(q.quantization_config, "load_in_4bit", False))
    if hide:
        model.hf_quantizer = None
    try:
        yield
    finally:
        if hide:
            model.hf_quantizer = q


def _decode(model: Any, enc: Any, max_new_tokens: int, tok: Any, kw: dict[str, Any], state: dict[str, str]) -> Any:
    """One batch through model.generate with the engine in `state`; a static cache that fails (compile error,
    out of memory) logs why and hands this batch and the rest of the call to the dynamic cache."""
    import torch

    # The model's generation_config carries the exported decoding defaults: every knob is explicit here.
    args = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    if state["engine"] == "static":
        try:
            with torch.no_grad(), _compilable(model):
                return model.generate(**enc, cache_implementation="static", **args)
        except RuntimeError as e:  # torch's compile and out-of-memory errors are RuntimeErrors
            log.warning("static-cache generation failed (%s: %s); using the dynamic cache for the rest of this "
                        "call", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            state["engine"] = "dynamic"
            torch.cuda.empty_cache()
    with torch.no_grad():
        return model.generate(**enc, **args)


def _generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str | None,
              kw: dict[str, Any], engine: str | None = None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    state = {"engine": engine or generation_engine(model)}
    try:
        for i in tqdm(starts, desc=desc, unit="batch", disable=desc is None, mininterval=5.0):
            idx = order[i : i + batch_size]
            pad = PAD_MULTIPLE if state["engine"] == "static" else None
            enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=True,
                      pad_to_multiple_of=pad).to(dev)
            gen = _decode(model, enc, max_new_tokens, tok, kw, state)
            new = gen[:, enc["input_ids"].shape[1] :]
            for j, row in zip(idx, new.tolist(), strict=True):
                stopped = tok.eos_token_id in row
                ids = row[: row.index(tok.eos_token_id)] if stopped else row
                ids = [t for t in ids if t != tok.pad_token_id]
                out[j] = {"text": tok.decode(ids, skip_special_tokens=True), "ids": ids, "stopped": stopped}
    finally:
        tok.padding_side = old_side
    return [o for o in out if o is not None]
