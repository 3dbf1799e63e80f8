"""`make serve` (kmed/serve.py): llama-cpp-python's OpenAI-compatible server on an exported GGUF, asked with the
`openai` client the way users ask it, on loopback.

The model is a tiny Llama trained here until it writes the R1 format for the repo's seed prompt, merged the way
merge writes a model (chat template from kmed/prompt.py, decoding defaults in generation_config.json), converted
by llama.cpp's converter: what a user gets from `make repro`, in seconds. The embedded default's own answers
through the same server are in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kmed.evaluation import check_format
from kmed.serve import DecodingDefaults, request_defaults
from tests.stagekit import free_port, stage_env, stop_process, tiny_records, wait_http

SYSTEM = "You are a medical expert."
DEC = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 48}


def test_the_decoding_defaults_fill_only_what_a_request_leaves_out() -> None:
    seen: list[dict] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        msg = await receive()
        seen.append({"body": json.loads(msg["body"]), "len": dict(scope["headers"])[b"content-length"]})

    async def run(body: bytes, path: str = "/v1/chat/completions") -> None:
        sent = iter([{"type": "http.request", "body": body[:5], "more_body": True},
                     {"type": "http.request", "body": body[5:], "more_body": False}])

        async def receive() -> dict:
            return next(sent)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"1")]}
        await DecodingDefaults(app, request_defaults(DEC))(scope, receive, None)

    asyncio.run(run(json.dumps({"messages": [], "temperature": 0.2, "top_p": None}).encode()))
    body = seen[-1]["body"]
    assert body["temperature"] == 0.2  # the client's own value stays
    assert (body["top_p"], body["top_k"], body["max_tokens"]) == (0.95, 0, 48)  # None and absent: the defaults
    assert int(seen[-1]["len"]) == len(json.dumps(body).encode())
    greedy = request_defaults({**DEC, "do_sample": False})
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy


def _train_tiny_r1(out: Path, tok) -> None:  # noqa: ANN001
    """A 1-layer Llama with SmolLM2's vocabulary, trained on records in the seed's R1 format until it writes it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from kmed.lm import IGNORE, encode_record, padded_batches
    from kmed.prompt import chat_template

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    rows = [{**r, "prompt": r["prompt"].replace("You are a medical expert.", SYSTEM)} for r in tiny_records(8)]
    b = next(padded_batches([encode_record(tok, r["prompt"], r["completion"], 256) for r in rows], 8, tok.pad_token_id))
    lab = b["labels"][:, 1:]
    mask = lab != IGNORE
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):  # ~15 s on 2 idle cores: the vocabulary projection only where the loss is
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
        loss = torch.nn.functional.cross_entropy(model.lm_head(h[mask]), lab[mask])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.3, loss.item()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **{k: v for k, v in DEC.items()
                                                                                  if k != "max_new_tokens"})
    model.save_pretrained(out)
    tok.chat_template = chat_template("seed", SYSTEM, tok)
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smol_tokenizer):  # noqa: ANN001, ANN201
    import copy

    from kmed.ggufio import convert_f16

    root = tmp_path_factory.mktemp("serve")
    tok = copy.deepcopy(smol_tokenizer)
    _train_tiny_r1(root / "merged", tok)
    gguf = root / "export" / "model-f16.gguf"
    gguf.parent.mkdir()
    convert_f16(root / "merged", gguf)
    (gguf.parent / "decoding.json").write_text(json.dumps(DEC))
    port = free_port()
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kmed.serve", "--gguf", str(gguf), "--port", str(port)],
                            env=stage_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout=120)
        yield f"http://127.0.0.1:{port}/v1", tok
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.integration
def test_openai_client_gets_an_r1_answer_that_stops_at_eos(served) -> None:  # noqa: ANN001
    from openai import OpenAI

    from kmed.prompt import render_prompt

    url, tok = served
    client = OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60)
    q = "Case 3: the patient reports pain. What is the main symptom?"
    r = client.chat.completions.create(model="kmed-r1", messages=[{"role": "user", "content": q}])
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", text
    assert check_format(text)["ok"], text
    # The server fed exactly the training prompt (its chat template is the GGUF's, from kmed/prompt.py).
    assert r.usage.prompt_tokens == len(tok(render_prompt(SYSTEM, q), add_special_tokens=True)["input_ids"])


@pytest.mark.integration
def test_streaming_chat_and_the_answer_budget(served) -> None:  # noqa: ANN001
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="kmed-r1", stream=True, messages=[{"role": "user", "content": "Case 5: the patient reports 기침. "
                                                                             "What is the main symptom?"}])
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    assert len(parts) > 3 and finish == "stop" and check_format(text)["ok"], text
    # A client's own max_tokens wins over the default budget.
    r = client.chat.completions.create(model="kmed-r1", max_tokens=3, messages=[{"role": "user", "content": "Case 1"}])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
