"""`make serve` (kmed/serve.py): llama-cpp-python's OpenAI-compatible server on an exported GGUF, asked with the
`openai` client the way users ask it, on loopback.

The model is a tiny Llama trained here until it writes the R1 format for the repo's seed prompt, merged the way
merge writes a model (chat template from kmed/prompt.py, decoding defaults in generation_config.json), converted
by llama.cpp's converter: what a user gets from `make repro`, in seconds. The embedded default's own answers
through the same server are in bench/RESULTS.md.

Issue 37 (a server a team shares): the API key beyond loopback, the default bind address, 400s in OpenAI's
error shape with nothing internal, a generic 500, the decoding defaults through the real server (issue 38).
Load and the queue bound: tests/test_serve_soak.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmed.evaluation import check_format
from kmed.serve import KEY_ENV, DecodingDefaults, request_defaults
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


def tiny_r1_export(tmp_path_factory, smol_tokenizer) -> tuple[Path, Any]:  # noqa: ANN001
    """models/export as a user has it: the tiny R1 model's f16 GGUF and decoding.json (DEC); built once a session,
    tests/test_serve_soak.py reuses it. Returns (GGUF, its tokenizer)."""
    from kmed.ggufio import convert_f16
    from kmed.prompt import chat_template

    root = tmp_path_factory.getbasetemp() / "tiny-r1-serve"
    gguf = root / "export" / "model-f16.gguf"
    tok = copy.deepcopy(smol_tokenizer)
    if gguf.is_file():
        tok.chat_template = chat_template("seed", SYSTEM, tok)
        return gguf, tok
    _train_tiny_r1(root / "merged", tok)
    gguf.parent.mkdir(parents=True)
    convert_f16(root / "merged", gguf)
    (gguf.parent / "decoding.json").write_text(json.dumps(DEC))
    return gguf, tok


def start_server(gguf: Path, log: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`python -m kmed.serve --gguf <gguf>` on a free port, without KMED_SERVE_API_KEY unless `env` sets it;
    waits until it answers. Returns (process, base URL)."""
    port = free_port()
    full = stage_env()
    full.pop(KEY_ENV, None)
    full.update(env)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kmed.serve", "--gguf", str(gguf), "--port", str(port), *args],
                                env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        key = env.get(KEY_ENV)
        if key:
            wait_authorized(f"http://127.0.0.1:{port}/v1/models", proc, key)
        else:
            wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout=120)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_authorized(url: str, proc: subprocess.Popen, key: str, timeout: float = 120) -> None:
    wait_http(url, proc, timeout, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory, smol_tokenizer):  # noqa: ANN001, ANN201
    """The server as `make serve` starts it: default host, no key."""
    gguf, tok = tiny_r1_export(tmp_path_factory, smol_tokenizer)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(gguf, log)
    try:
        yield url, tok, log
    finally:
        stop_process(proc)


@pytest.mark.integration
def test_openai_client_gets_an_r1_answer_that_stops_at_eos(served) -> None:  # noqa: ANN001
    from openai import OpenAI

    from kmed.prompt import render_prompt

    url, tok, _ = served
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

    url, _, _ = served
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


# --- a server a team can share (issue 37): key, bind address, clean errors ------------------------------------
KEY = "kmed-test-key-7f3a9c2e51d04b68"  # a canary: must never reach the server's log
SHARED_DEC = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6}
USER = [{"role": "user", "content": "Case 3: the patient reports pain. What is the main symptom?"}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, smol_tokenizer):  # noqa: ANN001, ANN201
    """The server with KMED_SERVE_API_KEY set and no --host, decoding defaults of its own (SHARED_DEC: 6 tokens
    at temperature 1.5, so a request that gets them is observable)."""
    gguf, _ = tiny_r1_export(tmp_path_factory, smol_tokenizer)
    root = tmp_path_factory.mktemp("serve-keyed")
    (root / "decoding.json").write_text(json.dumps(SHARED_DEC))
    log = root / "serve.log"
    proc, url = start_server(gguf, log, "--decoding", str(root / "decoding.json"), **{KEY_ENV: KEY})
    try:
        yield url, proc, log
    finally:
        stop_process(proc)


def _bodyless(text: str) -> None:
    """An error body carries no traceback, source path or exception type."""
    for leak in ("Traceback", 'File "', "site-packages", "/work", ".py", "Error:", "jinja", "llama_cpp"):
        assert leak not in text, (leak, text)


def _openai_error(resp: Any, status: int) -> dict:
    """The body of an error answer in OpenAI's shape, with one sentence and nothing internal."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    _bodyless(resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    msg = err["message"]
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    return err


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("10.1.2.3", False), ("myhost.example", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    from kmed.serve import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_a_non_loopback_bind_without_a_key_refuses_to_start(tmp_path: Path, host: str) -> None:
    # No GGUF is needed: the refusal comes before anything is loaded.
    env = stage_env()
    env.pop(KEY_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "kmed.serve", "--gguf", str(tmp_path / "none.gguf"), "--host", host],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
    assert KEY_ENV in line and "127.0.0.1" in line and host in line, line
    assert "Traceback" not in proc.stderr
    # A key too short to be a secret is refused as well, on any address.
    short = subprocess.run([sys.executable, "-m", "kmed.serve", "--gguf", str(tmp_path / "none.gguf"), "--host", host],
                           env={**env, KEY_ENV: "secret"}, capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "shorter than 16 characters" in short.stderr, short.stderr


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "x"}]', None),  # malformed JSON
    (b'["messages"]', None),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "developer", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}).encode(),
     "messages[1].role"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": 5}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= ( broken"}).encode(), "grammar"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}).encode(), "logit_bias"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
])
def test_request_checks_name_the_field_in_one_sentence(body: bytes, param: str | None) -> None:
    from kmed.serve import BadRequest, check_request

    with pytest.raises(BadRequest) as e:
        check_request("/v1/chat/completions", body)
    assert e.value.param == param and e.value.message.endswith("."), (e.value.param, e.value.message)
    ok = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "temperature": 0,
          "top_p": 1, "max_tokens": 1, "stop": ["\n"], "seed": 3, "logit_bias": {"2": -100}}
    assert check_request("/v1/chat/completions", json.dumps(ok).encode())["max_tokens"] == 1


def test_the_gate_answers_an_exception_in_the_app_with_a_generic_500(caplog) -> None:  # noqa: ANN001
    from kmed.serve import GENERIC_500, Gate

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        raise RuntimeError("secret detail at /srv/kmed/model.gguf")

    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(msg)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": [], "client": ("127.0.0.1", 1)}
    with caplog.at_level("ERROR", logger="kmed.serve"):
        asyncio.run(Gate(app, None, 2)(scope, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["error"]["message"] == GENERIC_500 and "secret" not in sent[1]["body"].decode()
    assert "secret detail" in caplog.text and "Traceback" in caplog.text  # the real cause: in the log only


@pytest.mark.integration
def test_bad_requests_get_a_400_in_openai_shape_with_nothing_internal(served) -> None:  # noqa: ANN001
    import httpx
    import openai
    from openai import OpenAI

    url, _, log = served
    before = log.read_text().count(" 400 ")
    with httpx.Client(timeout=60) as http:
        err = _openai_error(http.post(url + "/chat/completions", content=b'{"messages": [', headers={
            "content-type": "application/json"}), 400)
        assert err["code"] == "invalid_json"
    client = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60)
    cases = [({"messages": "hi"}, "messages"),
             ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
             ({"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "system", "content": "c"}]}, "messages[2].role"),
             ({"messages": USER, "temperature": -1}, "temperature"),
             ({"messages": USER, "max_tokens": -5}, "max_tokens"),
             ({"messages": USER, "top_p": 2}, "top_p")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="kmed-r1", **kwargs)
        _openai_error(e.value.response, 400)
        assert e.value.response.json()["error"]["param"] == param, e.value.response.text
    # The supported roles are named; the server then answers a good request as before.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="kmed-r1", messages=[{"role": "developer", "content": "x"}])
    assert "system, user and assistant" in e.value.response.json()["error"]["message"]
    r = client.chat.completions.create(model="kmed-r1", messages=USER, max_tokens=4)
    assert r.usage.completion_tokens <= 4
    text = log.read_text()
    assert text.count(" 400 ") - before == len(cases) + 2  # one line per 4xx
    assert "Traceback" not in text  # a 4xx logs no traceback


@pytest.mark.integration
def test_a_failure_inside_the_app_answers_a_generic_500(served) -> None:  # noqa: ANN001
    import httpx

    from kmed.serve import GENERIC_500

    url, _, log = served
    # llama-cpp-python raises inside its handler (the model is not opened for embeddings): a real server error.
    r = httpx.post(url + "/embeddings", json={"input": "hello", "model": "kmed-r1"}, timeout=60)
    assert r.status_code == 500
    _bodyless(r.text)
    assert r.json()["error"] == {"message": GENERIC_500, "type": "server_error", "param": None, "code": None}
    assert "embedding=True" not in r.text  # the app's own message
    text = log.read_text()
    assert "embedding=True" in text and "Traceback" in text  # it and the traceback are in the log
    assert httpx.get(url + "/models", timeout=30).status_code == 200  # still up


@pytest.mark.integration
def test_default_bind_address_is_loopback(keyed) -> None:  # noqa: ANN001
    import psutil

    _, proc, log = keyed  # started without --host
    listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    assert "on http://127.0.0.1:" in log.read_text()


@pytest.mark.integration
def test_with_a_key_a_request_without_it_is_401(keyed) -> None:  # noqa: ANN001
    import httpx
    import openai
    from openai import OpenAI

    url, _, log = keyed
    for api_key in ("wrong-key-0123456789abcdef", KEY[:-1]):
        client = OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            client.chat.completions.create(model="kmed-r1", messages=USER)
        assert _openai_error(e.value.response, 401)["code"] == "invalid_api_key"
    # No header at all, on every route, the model list included; a malformed body is refused for the key first.
    assert httpx.get(url + "/models", timeout=30).status_code == 401
    assert httpx.post(url + "/chat/completions", content=b"{", timeout=30).status_code == 401
    ok = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert ok.chat.completions.create(model="kmed-r1", messages=USER).choices[0].message.content
    text = log.read_text()
    assert text.count(" 401 ") == 4
    assert KEY not in text and KEY[:-1] not in text and "wrong-key" not in text  # no key in the log


@pytest.mark.integration
def test_a_request_without_sampling_fields_gets_the_decoding_defaults(keyed) -> None:  # noqa: ANN001
    from openai import OpenAI

    url, _, _ = keyed
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    plain = client.chat.completions.create(model="kmed-r1", messages=USER, seed=11)
    # decoding.json's max_new_tokens is the answer budget (llama-cpp-python's own: until EOS) ...
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == SHARED_DEC["max_new_tokens"]
    # ... and its temperature, top_p and top_k are what it sampled with: the same seed with them spelled out
    # gives the same answer.
    spelled = client.chat.completions.create(
        model="kmed-r1", messages=USER, seed=11, temperature=SHARED_DEC["temperature"], top_p=SHARED_DEC["top_p"],
        max_tokens=SHARED_DEC["max_new_tokens"], extra_body={"top_k": SHARED_DEC["top_k"], "min_p": 0.0})
    assert spelled.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.gpu
def test_on_a_gpu_build_every_layer_that_fits_is_offloaded(tmp_path_factory, smol_tokenizer) -> None:  # noqa: ANN001
    import llama_cpp
    from openai import OpenAI

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("llama.cpp has no GPU backend here (a CPU build); run on the GPU machine")
    gguf, _ = tiny_r1_export(tmp_path_factory, smol_tokenizer)
    log = tmp_path_factory.mktemp("serve-gpu") / "serve.log"
    proc, url = start_server(gguf, log)  # no --n-gpu-layers: the default
    try:
        assert "n_gpu_layers=-1 (llama.cpp has a GPU backend; every layer fits)" in log.read_text()
        r = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60).chat.completions.create(
            model="kmed-r1", messages=USER)
        assert r.choices[0].finish_reason == "stop" and check_format(r.choices[0].message.content)["ok"]
    finally:
        stop_process(proc)
