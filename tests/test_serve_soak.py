"""`make serve` (kmed/serve.py) under load, on loopback with the real server and the tiny R1 GGUF of
tests/test_serve.py: the bound on waiting requests (503 with Retry-After, at once) and a soak of concurrent
`openai` clients with streams cancelled mid-way and bad requests among them (bench/bench_serve.py's clients;
the bench runs the same against a real GGUF for longer, bench/RESULTS.md)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.bench_serve import Load, rss_mb
from tests.stagekit import stop_process
from tests.test_serve import USER, start_server, tiny_r1_export

MAX_QUEUE = 2
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, smol_tokenizer):  # noqa: ANN001, ANN201
    """The server with --max-queue 2 (one request runs, two may wait) on one thread."""
    gguf, tok = tiny_r1_export(tmp_path_factory, smol_tokenizer)
    log = tmp_path_factory.mktemp("serve-soak") / "serve.log"
    proc, url = start_server(gguf, log, "--max-queue", str(MAX_QUEUE), "--threads", "1")
    try:
        yield url, proc, log, tok.eos_token_id
    finally:
        stop_process(proc)


def _long_requests(url: str, n: int, eos: int, max_tokens: int = 400) -> list[tuple[int, dict, float, str | None]]:
    """n chat requests at once, EOS banned so each runs max_tokens: (status, body, seconds, Retry-After)."""
    import httpx

    def one(i: int) -> tuple[int, dict, float, str | None]:
        t0 = time.monotonic()
        r = httpx.post(url + "/chat/completions", timeout=300, json={
            "messages": USER, "max_tokens": max_tokens, "seed": i, "logit_bias": {str(eos): -100}})
        return r.status_code, r.json(), time.monotonic() - t0, r.headers.get("retry-after")

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_request_beyond_the_queue_gets_503_with_retry_after_at_once(busy_server) -> None:  # noqa: ANN001
    url, _, log, eos = busy_server
    out = _long_requests(url, 2 * (1 + MAX_QUEUE), eos)
    ok = [o for o in out if o[0] == 200]
    busy = [o for o in out if o[0] == 503]
    assert len(ok) + len(busy) == len(out), [o[:2] for o in out]
    assert len(ok) >= 1 + MAX_QUEUE and busy, [o[0] for o in out]  # the running one and the waiting ones finish
    for _, body, secs, retry in busy:
        assert retry is not None and int(retry) >= 1, retry
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "server_error", body
        assert secs < min(s for _, _, s, _ in ok), (secs, [o[2] for o in ok])  # refused at once, not a hang
    assert all(body["choices"][0]["finish_reason"] == "length" for _, body, _, _ in ok)
    assert log.read_text().count(" 503 ") == len(busy)  # one line each


def test_soak_of_concurrent_clients_with_cancelled_streams_loses_nothing(busy_server) -> None:  # noqa: ANN001
    url, proc, log, eos = busy_server
    load = Load(url, None, max_tokens=16, eos_id=eos, retries=20)
    load.request(load.client(), "plain", seed=0)  # warm-up: first-call allocations are not a leak
    rss0 = rss_mb(proc.pid)
    clients, per_client, cancel_every, bad_every = 4, 10, 4, 5
    res = load.run(clients, per_client, cancel_every=cancel_every, bad_every=bad_every)
    print("soak:", json.dumps(res))  # p50/p95 for bench/RESULTS.md
    assert proc.poll() is None  # the server stayed up
    assert res["lost"] == 0, res["lost_detail"]  # every request: 200, a cancelled stream or the 400 it asked for
    kinds = [("bad" if i % bad_every == bad_every - 1 else "cancel" if i % cancel_every == cancel_every - 1 else "ok")
             for i in range(per_client)]
    assert res["outcomes"] == {"ok": clients * kinds.count("ok"), "cancelled": clients * kinds.count("cancel"),
                               "400": clients * kinds.count("bad")}, res["outcomes"]
    assert res["finish"] == ["length"]  # whole answers, none cut short by another request
    # 4 clients on 1 + 2 places: some were turned away with Retry-After and came back (the client's retries).
    assert res["busy_503"] >= 1 and res["retry_after"] and all(int(s) >= 1 for s in res["retry_after"]), res
    # No slot leaked by a cancelled stream: the full 1 + MAX_QUEUE are admitted again ...
    out = _long_requests(url, 1 + MAX_QUEUE, eos, max_tokens=32)
    assert [o[0] for o in out] == [200] * (1 + MAX_QUEUE), [o[:2] for o in out]
    # ... and memory is back near where it was (a leak of the cancelled streams' state would grow it).
    rss1 = rss_mb(proc.pid)
    assert rss1 < rss0 + 40, (rss0, rss1)
    assert "Traceback" not in log.read_text()
