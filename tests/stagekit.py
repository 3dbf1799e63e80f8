"""Helpers for tests that run the real stage entry points in a throwaway workdir."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KMED_MLFLOW": "0",
                "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    env.update(extra)
    return env


def write_params(workdir: Path, **overrides: Any) -> Path:
    """params.yaml = the repo's, with dotted-key overrides (e.g. {"train.max_steps": 4})."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *path, last = dotted.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    out = workdir / "params.yaml"
    out.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return out


def run_stage(workdir: Path, module: str, *args: str, check: bool = True, timeout: int = 600,
              **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=workdir, env=stage_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def tiny_records(n: int, lang_mix: bool = True) -> list[dict[str, str]]:
    """Rendered R1 records with a learnable pattern (the answer repeats a word from the question)."""
    from kmed.data import render_completion, render_prompt

    words = ["fever", "cough", "rash", "pain", "발열", "기침", "두통", "구토"]
    rows = []
    for i in range(n):
        w = words[i % len(words)] if lang_mix else words[i % 4]
        q = f"Case {i}: the patient reports {w}. What is the main symptom?"
        rows.append({"prompt": render_prompt("You are a medical expert.", q),
                     "completion": render_completion(f"The question mentions {w}.", f"The main symptom is {w}.",
                                                     "<|im_end|>")})
    return rows


def write_split(workdir: Path, stage: str, train: list[dict[str, str]], val: list[dict[str, str]]) -> None:
    d = workdir / "data" / "processed" / stage
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Local servers for integration tests (moto S3, mlflow server)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60, headers: dict[str, str] | None = None) -> None:
    """Poll `url` (with `headers`) until it answers 200; fail early if the server process died."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the server's process group (mlflow server forks workers), SIGKILL if it lingers."""
    import signal

    own_group = proc.poll() is None and os.getpgid(proc.pid) == proc.pid  # started with start_new_session

    def kill(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig) if own_group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        kill(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    kill(signal.SIGKILL)  # stragglers in the group, if any
    proc.wait(timeout=grace)


@contextlib.contextmanager
def moto_s3_server(log_dir: Path) -> Iterator[str]:
    """moto's standalone S3 server (a real HTTP S3 endpoint) on a free loopback port; always stopped."""
    port = free_port()
    with (log_dir / "moto.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/moto-api/", proc, timeout=60)
            yield url
        finally:
            stop_process(proc)


@contextlib.contextmanager
def mlflow_server(store: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` (sqlite backend in `store`, proxied artifacts) on loopback; always stopped
    (its whole process group). Yields (url, process) so a test can also kill it mid-run."""
    store.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Job execution spawns a job runner and several huey consumers: not needed for tracking.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (store / "server.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", proc, timeout=120)
            yield url, proc
        finally:
            stop_process(proc)
