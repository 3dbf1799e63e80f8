"""`make serve`: an OpenAI-compatible server on the exported GGUF, prompted and decoded as trained.

    python -m kmed.serve                      # models/export/model-q4_k_m.gguf on http://127.0.0.1:8000/v1
    python -m kmed.serve --gguf models/export/model-q8_0.gguf --port 8001

llama-cpp-python's own server (`llama-cpp-python[server]`, the llama.cpp that export already built). The
chat template is the GGUF's `tokenizer.chat_template` (the training prompt, kmed/prompt.py); the decoding
defaults (temperature, top_p, top_k, max_tokens) are export's `decoding.json`, filled into every request
that leaves them out — llama-cpp-python's own defaults (temperature 0.8, top_k 40, unlimited tokens) would
otherwise apply. A request that sets them keeps its values. Loopback only unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kmed.io import StageError, run_stage

log = logging.getLogger("kmed.serve")
EXPORT = Path("models/export")
PATHS = ("/v1/chat/completions", "/v1/completions")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def request_defaults(dec: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI request fields that carry the decoding defaults."""
    out: dict[str, Any] = {"max_tokens": dec["max_new_tokens"], "min_p": 0.0, "repeat_penalty": 1.0}
    if dec["do_sample"]:
        out.update(temperature=dec["temperature"], top_p=dec["top_p"], top_k=dec["top_k"])
    else:
        out.update(temperature=0.0)
    return out


class DecodingDefaults:
    """ASGI middleware: fills the decoding defaults into completion requests that leave them out."""

    def __init__(self, app: Any, defaults: dict[str, Any]) -> None:
        self.app, self.defaults = app, defaults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # the server answers the bad body itself
        if isinstance(data, dict):
            for k, v in self.defaults.items():
                if data.get(k) is None:
                    data[k] = v
            body = json.dumps(data).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def pick_gguf(export: Path, gguf: str | None) -> Path:
    if gguf:
        p = Path(gguf)
        if not p.is_file():
            raise StageError(f"{p}: no such GGUF file.")
        return p
    for name in ("model-q4_k_m.gguf", "model-q8_0.gguf", "model-f16.gguf"):
        if (export / name).is_file():
            return export / name
    found = sorted(export.glob("*.gguf"))
    if not found:
        raise StageError(f"{export}: no GGUF found; run `dvc repro export` first.")
    return found[0]


def build_app(gguf: Path, dec: dict[str, Any], n_ctx: int, n_threads: int) -> Any:
    """llama-cpp-python's FastAPI app on `gguf` (its chat template from the GGUF), wrapped in the defaults."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from kmed.ggufio import no_cpu_repack

    model = ModelSettings(model=str(gguf), model_alias="kmed-r1", n_ctx=n_ctx, n_threads=n_threads,
                          n_threads_batch=n_threads, n_gpu_layers=0, verbose=False)
    with no_cpu_repack():  # loads the model now: AMX CPUs crash on repacked quantized weights (kmed.ggufio)
        app = create_app(server_settings=ServerSettings(), model_settings=[model])
    return DecodingDefaults(app, request_defaults(dec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF to serve (default: models/export/model-q4_k_m.gguf)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="0: the cores this process may use")
    args = ap.parse_args()

    import uvicorn

    from kmed.ggufio import cpu_threads

    gguf = pick_gguf(EXPORT, args.gguf)
    dec_path = gguf.parent / "decoding.json"
    if not dec_path.is_file():
        raise StageError(f"{dec_path} is missing; run `dvc repro export` (it writes the decoding defaults).")
    dec = json.loads(dec_path.read_text(encoding="utf-8"))
    app = build_app(gguf, dec, args.n_ctx, args.threads or cpu_threads())
    log.info("serving %s as model 'kmed-r1' on http://%s:%d/v1 with decoding defaults %s", gguf, args.host,
             args.port, request_defaults(dec))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_stage(main)
