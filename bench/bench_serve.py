"""`make serve` under load: single-stream and N-client tokens/s, a soak with cancelled streams, p50/p95 latency.

    python bench/bench_serve.py --gguf models/export/model-q4_k_m.gguf                  # 4 clients x 25 requests
    python bench/bench_serve.py --gguf /data/7b-q4_k_m.gguf --clients 8 --requests 20 --max-tokens 256

Starts `python -m kmed.serve` on the GGUF as a subprocess on a free loopback port (its flags after `--` go to
it, e.g. `-- --n-gpu-layers -1`; by default it picks the GPU itself), then asks it with the `openai` client:
1. single stream: `--single` requests one after another, `--max-tokens` each;
2. the soak: `--clients` threads x `--requests` each, a mix of plain requests, streamed ones, streams closed
   after two chunks (every `--cancel-every`-th) and bad requests (every `--bad-every`-th, a negative
   temperature, which must come back 400). 503s are retried as the client does (`Retry-After`).
EOS is banned (`logit_bias`) so every answer is `--max-tokens` long: tokens/s compare across models, and a
random-weight GGUF (the GPU proof's shapes) works as well as a trained one. The server's RSS is read before
and after. One JSON line goes to stdout and is appended to `--out`. Without decoding.json beside the GGUF the
recipe's R1 defaults are used (`--decoding` to give one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "A 54-year-old man has crushing chest pain for 30 minutes. What is the "
                                        "first test to order, and why?"}]
R1_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf: Path, port: int, log_path: Path, extra: list[str], env: dict[str, str] | None = None,
                 decoding: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kmed.serve", "--gguf", str(gguf), "--port", str(port), *extra]
    if decoding is not None:
        cmd += ["--decoding", str(decoding)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log:
        return subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, key: str | None = None, timeout: float = 600) -> None:
    """Poll GET /v1/models until 200; fail at once if the server exited."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo = int(i)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)


class Load:
    """The soak's clients: one `openai` client per thread, 503 responses counted through an httpx hook."""

    def __init__(self, url: str, key: str | None, max_tokens: int, eos_id: int | None, retries: int = 8) -> None:
        self.url, self.key, self.max_tokens, self.retries = url, key, max_tokens, retries
        self.bias = {str(eos_id): -100} if eos_id is not None else None
        self.busy = 0  # 503s seen (each retried by the client after Retry-After)
        self.retry_after: set[str] = set()
        self.lock = threading.Lock()

    def client(self) -> Any:
        import httpx
        from openai import OpenAI

        def hook(resp: httpx.Response) -> None:
            if resp.status_code == 503:
                with self.lock:
                    self.busy += 1
                    self.retry_after.add(resp.headers.get("retry-after", ""))

        http = httpx.Client(event_hooks={"response": [hook]}, timeout=600)
        return OpenAI(base_url=self.url, api_key=self.key or "-", max_retries=self.retries, http_client=http)

    def request(self, client: Any, kind: str, seed: int) -> dict[str, Any]:
        """One request of `kind` (plain, stream, cancel, bad): its outcome, latency and tokens."""
        import openai

        args: dict[str, Any] = dict(model="kmed-r1", messages=MESSAGES, max_tokens=self.max_tokens, seed=seed)
        if self.bias:
            args["logit_bias"] = self.bias
        t0 = time.perf_counter()
        try:
            if kind == "bad":
                client.chat.completions.create(**args, temperature=-1)
                return {"kind": kind, "outcome": "accepted-bad"}
            if kind == "plain":
                r = client.chat.completions.create(**args)
                return {"kind": kind, "outcome": "ok", "s": time.perf_counter() - t0,
                        "tokens": r.usage.completion_tokens, "finish": r.choices[0].finish_reason}
            stream = client.chat.completions.create(**args, stream=True)
            chunks, first, finish = 0, None, None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    first = first or time.perf_counter() - t0
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if kind == "cancel" and chunks >= 2:
                    stream.close()  # the client walks away mid-answer
                    return {"kind": kind, "outcome": "cancelled", "s": time.perf_counter() - t0, "tokens": chunks}
            return {"kind": kind, "outcome": "ok", "s": time.perf_counter() - t0, "ttft": first, "tokens": chunks,
                    "finish": finish}
        except openai.BadRequestError as e:
            return {"kind": kind, "outcome": "400" if kind == "bad" else "unexpected-400", "detail": str(e)[:200]}
        except openai.APIStatusError as e:
            return {"kind": kind, "outcome": f"http-{e.status_code}", "detail": str(e)[:200]}
        except Exception as e:  # a dropped connection, a timeout: lost
            return {"kind": kind, "outcome": "error", "detail": f"{type(e).__name__}: {e}"[:200]}

    def run(self, clients: int, requests: int, cancel_every: int, bad_every: int) -> dict[str, Any]:
        def kind(i: int) -> str:
            if bad_every and i % bad_every == bad_every - 1:
                return "bad"
            if cancel_every and i % cancel_every == cancel_every - 1:
                return "cancel"
            return "stream" if i % 2 else "plain"

        def worker(c: int) -> list[dict[str, Any]]:
            client = self.client()
            return [self.request(client, kind(i), seed=1000 * c + i) for i in range(requests)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            rows = [r for rs in pool.map(worker, range(clients)) for r in rs]
        wall = time.perf_counter() - t0
        return summarize(rows, wall) | {"busy_503": self.busy, "retry_after": sorted(self.retry_after)}


def summarize(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    done = [r for r in rows if r["outcome"] == "ok"]
    lat = [r["s"] for r in done]
    ttft = [r["ttft"] for r in done if r.get("ttft") is not None]
    tokens = sum(r.get("tokens", 0) for r in rows)
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    lost = [r for r in rows if r["outcome"] not in ("ok", "cancelled", "400")]
    return {"requests": len(rows), "outcomes": outcomes, "lost": len(lost), "lost_detail": lost[:3],
            "wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else None,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5),
            "finish": sorted({r.get("finish") for r in done if r.get("finish")})}


def single_stream(load: Load, n: int) -> dict[str, Any]:
    """n plain requests one after another: the rate one user sees."""
    client = load.client()
    rows = [load.request(client, "plain", seed=i) for i in range(n)]
    wall = sum(r.get("s", 0) for r in rows)
    return summarize(rows, wall)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text})


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="models/export/model-q4_k_m.gguf")
    ap.add_argument("--decoding", help="decoding.json (default: beside the GGUF, else R1's defaults)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single", type=int, default=3, help="single-stream requests")
    ap.add_argument("--cancel-every", type=int, default=5)
    ap.add_argument("--bad-every", type=int, default=10)
    ap.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue (default: clients)")
    ap.add_argument("--out", default="bench/results/serve-soak.jsonl")
    ap.add_argument("--label", default="", help="free text kept in the JSON line (e.g. '7B q4_k_m, H100')")
    ap.add_argument("server_args", nargs="*", help="after --: more flags for kmed.serve")
    args = ap.parse_args()

    from kmed.ggufio import read_meta

    gguf = Path(args.gguf)
    if not gguf.is_file():
        print(f"{gguf}: no such GGUF file.", file=sys.stderr)
        return 2
    eos = read_meta(gguf)["tokenizer.ggml.eos_token_id"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    decoding = Path(args.decoding) if args.decoding else gguf.parent / "decoding.json"
    if not decoding.is_file():
        decoding = tmp / "decoding.json"
        decoding.write_text(json.dumps(R1_DEFAULTS))
    port = free_port()
    max_queue = args.max_queue if args.max_queue is not None else args.clients
    log_path = tmp / "serve.log"
    t0 = time.perf_counter()
    proc = start_server(gguf, port, log_path, ["--max-queue", str(max_queue), *args.server_args],
                        decoding=decoding)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, proc)
        load_s = time.perf_counter() - t0
        load = Load(url, None, args.max_tokens, eos)
        load.request(load.client(), "plain", seed=0)  # warm-up: first-call allocations are not a leak
        rss0 = rss_mb(proc.pid)
        single = single_stream(load, args.single)
        soak = load.run(args.clients, args.requests, args.cancel_every, args.bad_every)
        rss1 = rss_mb(proc.pid)
        alive = proc.poll() is None
        wait_ready(url, proc, timeout=30)  # still answers
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    server_log = log_path.read_text(errors="replace")
    setup = [ln.split("kmed.serve: ", 1)[1] for ln in server_log.splitlines() if "INFO kmed.serve: n_gpu_layers" in ln]
    row = {"date": time.strftime("%Y-%m-%d"), "label": args.label, "gguf": str(gguf),
           "gguf_gb": round(gguf.stat().st_size / 1e9, 2), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
           "gpu": gpu_name(), "server": setup[0] if setup else None, "load_s": round(load_s, 1),
           "max_tokens": args.max_tokens, "clients": args.clients, "requests_per_client": args.requests,
           "max_queue": max_queue, "single_tokens_per_s": single["tokens_per_s"], "single_p50_s": single["p50_s"],
           "soak": soak, "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1), "alive": alive,
           "server_tracebacks": server_log.count("Traceback")}
    line = json.dumps(row, ensure_ascii=False)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0 if alive and soak["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
