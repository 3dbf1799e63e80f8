"""`make serve`: an OpenAI-compatible server on the exported GGUF, prompted and decoded as trained.

    python -m kmed.serve                      # models/export/model-q4_k_m.gguf on http://127.0.0.1:8000/v1
    python -m kmed.serve --gguf models/export/model-q8_0.gguf --port 8001
    KMED_SERVE_API_KEY=... python -m kmed.serve --host 0.0.0.0   # beyond loopback: a key is required

llama-cpp-python's own server (`llama-cpp-python[server]`, the llama.cpp that export already built). The
chat template is the GGUF's `tokenizer.chat_template` (the training prompt, kmed/prompt.py); the decoding
defaults (temperature, top_p, top_k, max_tokens) are export's `decoding.json`, filled into every request
that leaves them out — llama-cpp-python's own defaults (temperature 0.8, top_k 40, unlimited tokens) would
otherwise apply. A request that sets them keeps its values.

In front of llama-cpp-python's app sits `Gate` (ASGI middleware), for a server a team shares:
- **API key**: from the environment (`KMED_SERVE_API_KEY`), never argv; required when the bind address is
  not loopback (the server refuses to start otherwise); every request without `Authorization: Bearer <key>`
  gets a 401. Compared in constant time, never logged.
- **Clean errors**: completion bodies are checked before the app sees them (JSON object, `messages`, roles
  the chat template accepts, OpenAI's documented ranges, types): a 400 in OpenAI's error shape with one
  sentence. Whatever still fails inside the app answers a generic 500; its text and traceback go to the
  server log only. One log line per 4xx.
- **Load**: llama-cpp-python runs one request at a time per model, the others wait for it in arrival order.
  At most `--max-queue` may wait: beyond that a request gets 503 with `Retry-After`, at once.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from kmed.io import StageError, run_stage

log = logging.getLogger("kmed.serve")
EXPORT = Path("models/export")
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/engines/copilot-codex/completions")
KEY_ENV = "KMED_SERVE_API_KEY"
MIN_KEY_CHARS = 16
MAX_BODY = 4 * 2**20  # bytes; a prompt that fills a 128k-token context is ~0.5 MB of text
ROLES = ("system", "user", "assistant")  # what kmed/prompt.py's chat template renders; it raises on others
# OpenAI's documented ranges (API reference, chat/completions); top_k and min_p are llama.cpp's.
RANGES: dict[str, tuple[float, float]] = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
                                          "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
INT_MIN = {"max_tokens": 1, "top_k": 0, "n": 1, "seed": None, "top_logprobs": 0}
GENERIC_500 = "The server failed while answering this request; the details are in the server log."

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


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it passes `limit` bytes."""
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
        if len(body) > limit:
            return None
    return body


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands `body` over once, then passes through (disconnect notices)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def with_length(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])


class DecodingDefaults:
    """ASGI middleware: fills the decoding defaults into completion requests that leave them out."""

    def __init__(self, app: Any, defaults: dict[str, Any]) -> None:
        self.app, self.defaults = app, defaults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive, MAX_BODY) or b""
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # Gate answers bad bodies before they get here
        if isinstance(data, dict):
            for k, v in self.defaults.items():
                if data.get(k) is None:
                    data[k] = v
            body = json.dumps(data).encode()
        await self.app(with_length(scope, body), replay(body, receive), send)


# --- request checks ---------------------------------------------------------------------------
class BadRequest(Exception):
    """A request the server refuses: one sentence, the field it is about, an error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampling(data: dict[str, Any]) -> None:
    """The sampling fields a request sets (null = leave it to the defaults) against their documented ranges."""
    for k, (lo, hi) in RANGES.items():
        v = data.get(k)
        if v is None:
            continue
        if not _is_number(v) or not math.isfinite(v):
            raise BadRequest(f"`{k}` must be a number between {lo:g} and {hi:g}.", k, "invalid_type")
        if not lo <= v <= hi:
            raise BadRequest(f"`{k}` is {v:g}; it must be between {lo:g} and {hi:g}.", k)
    for k, lo in INT_MIN.items():
        v = data.get(k)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise BadRequest(f"`{k}` must be an integer.", k, "invalid_type")
        if lo is not None and v < lo:
            raise BadRequest(f"`{k}` is {v}; it must be at least {lo}.", k)
    if data.get("n") not in (None, 1):
        raise BadRequest("`n` must be 1: this server returns one choice per request.", "n")
    if data.get("stream") is not None and not isinstance(data["stream"], bool):
        raise BadRequest("`stream` must be true or false.", "stream", "invalid_type")


def check_extensions(data: dict[str, Any]) -> None:
    """Fields that reach llama.cpp's native code unchecked: a malformed `grammar` there kills the whole server
    (seen: one request with `root ::= ( broken` ended the process), so grammars are not taken."""
    if data.get("grammar") is not None:
        raise BadRequest("`grammar` is not supported by this server.", "grammar", "unsupported_parameter")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object")
                            or fmt.get("schema") is not None):
        raise BadRequest("`response_format` may only be {\"type\": \"text\"} or {\"type\": \"json_object\"} here "
                         "(schemas become llama.cpp grammars, which this server does not take).", "response_format",
                         "unsupported_parameter")
    bias = data.get("logit_bias")
    if bias is not None and data.get("logit_bias_type") != "tokens":
        if not isinstance(bias, dict) or not all(isinstance(k, str) and k.strip().isdigit() and _is_number(v)
                                                 and -100 <= v <= 100 for k, v in bias.items()):
            raise BadRequest("`logit_bias` must map token ids to numbers between -100 and 100.", "logit_bias")


def check_messages(messages: Any, later_system: bool = False) -> None:
    """`messages` as the chat template renders them: system, user and assistant messages with text content; a
    system message only first unless `later_system` (kmed/prompt.py's template raises on a second one)."""
    if messages is None:
        raise BadRequest("`messages` is required: a list of {role, content} objects.", "messages",
                         "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of {role, content} objects.", "messages",
                         "invalid_type")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"`{where}` must be an object with `role` and `content`.", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            shown = json.dumps(role)[:40]
            raise BadRequest(f"`{where}.role` is {shown}; this model supports only the roles system, user and "
                             "assistant.", f"{where}.role", "unsupported_role")
        if role == "system" and i > 0 and not later_system:
            raise BadRequest(f"`{where}` is a second system message; only the first message may be a system "
                             "message.", f"{where}.role", "unsupported_role")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"`{where}.content` must be a string.", f"{where}.content", "invalid_type")


def field_path(data: Any, loc: tuple[Any, ...]) -> str:
    """pydantic's error location as the request's field path (`stop`, `messages[0].name`), without the union
    member names pydantic puts in it (`stop.str`)."""
    out, node = "", data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out, node = f"{out}.{part}" if out else str(part), node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out, node = f"{out}[{part}]", node[part]
        else:
            break
    return out or str(loc[0] if loc else "body")


def check_request(path: str, body: bytes, later_system: bool = False) -> dict[str, Any]:
    """The parsed body of a completion request, or BadRequest naming what is wrong with it."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", None, "invalid_type")
    try:  # a lone surrogate (`\\ud800`) is valid JSON but no text llama.cpp can tokenize
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("The request body holds a lone surrogate escape, which is not text.", None,
                         "invalid_value") from None
    if path == "/v1/chat/completions":
        check_messages(data.get("messages"), later_system)
        model: Any = CreateChatCompletionRequest
    else:
        prompt = data.get("prompt")
        # llama-cpp-python takes one prompt (it asserts on a longer list)
        if not (isinstance(prompt, str) or isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)):
            raise BadRequest("`prompt` must be a string.", "prompt", "invalid_type")
        model = CreateCompletionRequest
    check_sampling(data)
    check_extensions(data)
    try:  # every other field against llama-cpp-python's own request model, as its app will read it
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = field_path(data, err["loc"])
        raise BadRequest(f"`{loc}`: {err['msg'].rstrip('.')}.", loc, "invalid_type") from None
    return data


# --- the gate in front of the app --------------------------------------------------------------
def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def authorized(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Whether the request carries `Authorization: Bearer <key>` (compared in constant time)."""
    given = b""
    for k, v in headers:
        if k.lower() == b"authorization":
            scheme, _, token = v.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = token.strip()
    return hmac.compare_digest(given, key)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


class Gate:
    """ASGI middleware in front of llama-cpp-python's app: the API key, the request checks, the bound on
    waiting requests, and no internals in any answer."""

    def __init__(self, app: Any, key: str | None, max_queue: int, later_system: bool = False) -> None:
        self.app, self.key, self.max_queue = app, key.encode() if key else None, max_queue
        self.later_system = later_system  # whether the chat template takes a system message after the first
        self.inside = 0  # requests in the app: the one llama.cpp runs and those waiting for it
        self.service_s = 1.0  # moving average of a completion's time in the app: Retry-After's estimate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        client = scope.get("client") or ("-", 0)
        where = f"{method} {path} from {client[0]}"

        async def refuse(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                         code: str | None = None, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
            log.warning("%d %s: %s", status, where, message)  # one line per 4xx/503, no key, no body
            await send_json(send, status, error_body(message, type_, param, code), headers)

        if self.key is not None and not authorized(scope.get("headers", []), self.key):
            await refuse(401, "Missing or wrong API key; send it as `Authorization: Bearer <key>`.",
                         code="invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
            return
        if method == "POST" and path in PATHS:
            body = await read_body(receive, MAX_BODY)
            if body is None:
                await refuse(413, f"The request body is over {MAX_BODY // 2**20} MiB.", code="request_too_large")
                return
            try:
                check_request(path, body, self.later_system)
            except BadRequest as e:
                await refuse(400, e.message, param=e.param, code=e.code)
                return
            scope, receive = with_length(scope, body), replay(body, receive)
        if self.inside > self.max_queue:  # one running + max_queue waiting
            wait = max(1, min(60, math.ceil(self.service_s)))
            await refuse(503, f"The server is busy ({self.inside} requests running or waiting, at most "
                              f"{self.max_queue} may wait); retry after {wait} s.", "server_error", code="queue_full",
                         headers=((b"retry-after", str(wait).encode()),))
            return
        self.inside += 1
        t0 = time.monotonic()
        try:
            status = await self.scrubbed(scope, receive, send, where)
            if status == 200 and path in PATHS:
                self.service_s += 0.2 * (time.monotonic() - t0 - self.service_s)
        finally:
            self.inside -= 1

    async def scrubbed(self, scope: Scope, receive: Receive, send: Send, where: str) -> int:
        """Run the app; an error answer it gives comes out in OpenAI's shape, a 5xx without its text. Returns the
        status sent."""
        held: dict[str, Any] | None = None  # an error response's start, kept until its body is complete
        chunks: list[bytes] = []
        status = 0

        async def send_checked(msg: dict[str, Any]) -> None:
            nonlocal held, status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if status >= 400:
                    held = msg
                    return
            elif msg["type"] == "http.response.body" and held is not None:
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    await self.answer_error(send, held, b"".join(chunks), where)
                return
            await send(msg)

        try:
            await self.app(scope, receive, send_checked)
        except Exception:
            log.exception("500 %s: unhandled error in the app", where)  # the traceback: a real 5xx
            if status == 0 or held is not None:
                status = 500
                await send_json(send, 500, error_body(GENERIC_500, "server_error"))
        return status

    async def answer_error(self, send: Send, start: dict[str, Any], body: bytes, where: str) -> None:
        status = start["status"]
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        err = data.get("error") if isinstance(data, dict) else None
        if status >= 500:
            # llama-cpp-python's handler printed the traceback above; the answer carries none of it.
            log.error("%d %s: %s", status, where, _one_line(err.get("message", "") if isinstance(err, dict)
                                                             else body.decode(errors="replace")))
            await send_json(send, status, error_body(GENERIC_500, "server_error"))
            return
        if isinstance(err, dict) and isinstance(err.get("message"), str) and "Traceback" not in err["message"]:
            message, out = err["message"], body  # already OpenAI's shape (e.g. context_length_exceeded)
        else:  # FastAPI's {"detail": ...} (404, 405, a disconnected client) in OpenAI's shape
            detail = data.get("detail") if isinstance(data, dict) else None
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            message = (f"{phrase}: {_one_line(detail, 200).rstrip('.')}." if isinstance(detail, str)
                       and "\n" not in detail and detail.rstrip(".") != phrase else f"{phrase}.")
            out = error_body(message)
        log.warning("%d %s: %s", status, where, _one_line(message))
        extra = tuple((k, v) for k, v in start.get("headers", [])
                      if k.lower() not in (b"content-length", b"content-type"))
        await send_json(send, status, out, extra)


async def send_json(send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


# --- startup -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; any other name or address reaches beyond this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(host: str) -> str | None:
    """The API key from KMED_SERVE_API_KEY (never argv: it would show in `ps` and shell history); required
    off loopback."""
    key = os.environ.get(KEY_ENV, "").strip() or None
    if key is None and not is_loopback(host):
        raise StageError(f"Refusing to serve on {host} without an API key: set {KEY_ENV} (e.g. `export {KEY_ENV}="
                         "$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`) or bind to 127.0.0.1.")
    if key is not None and len(key) < MIN_KEY_CHARS:
        raise StageError(f"{KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; use a random one, e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    return key


def gpu_layers(gguf: Path, n_ctx: int) -> tuple[int, str]:
    """n_gpu_layers when --n-gpu-layers is left out, and why: 0 without a GPU backend in llama.cpp, else every
    layer that fits the free GPU memory (-1: all; kmed.ggufio.gpu_offload)."""
    from kmed.ggufio import gpu_backend, gpu_offload, isolated

    if not gpu_backend():
        return 0, "llama.cpp has no GPU backend (a CPU build)"
    # torch's CUDA probe of the free memory runs in a worker: torch's and llama.cpp's CUDA crash in one process
    n = isolated(gpu_offload, gguf, True, n_ctx)
    return n, "llama.cpp has a GPU backend; " + ("every layer fits" if n < 0 else f"{n} layers fit the free memory")


def later_system_ok(template: str | None) -> bool:
    """Whether a chat template renders a system message after the first (kmed/prompt.py's raises), tried in a
    sandbox at startup so the gate can answer that with a 400 rather than the app with a 500."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template:
        return True

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    msgs = [{"role": r, "content": "x"} for r in ("system", "user", "system", "user")]
    try:
        env.from_string(template).render(messages=msgs, add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:
        return False
    return True


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


def build_app(gguf: Path, dec: dict[str, Any], n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
              key: str | None = None, max_queue: int = 8) -> Any:
    """llama-cpp-python's FastAPI app on `gguf` (its chat template from the GGUF), wrapped in the decoding
    defaults and the gate."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from kmed.ggufio import no_cpu_repack, read_meta

    model = ModelSettings(model=str(gguf), model_alias="kmed-r1", n_ctx=n_ctx, n_threads=n_threads,
                          n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, verbose=False)
    # interrupt_requests off: its default ends a running stream (without finish_reason) whenever another
    # request arrives; a shared server lets each run to its end, the others wait (bounded by the gate).
    # api_key None: the gate checks the key (constant time, OpenAI's error shape), not an env var of its name.
    server = ServerSettings(interrupt_requests=False, api_key=None)
    with no_cpu_repack():  # loads the model now: AMX CPUs crash on repacked quantized weights (kmed.ggufio)
        app = create_app(server_settings=server, model_settings=[model])
    later_system = later_system_ok(read_meta(gguf)["tokenizer.chat_template"])
    return Gate(DecodingDefaults(app, request_defaults(dec)), key, max_queue, later_system)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF to serve (default: models/export/model-q4_k_m.gguf)")
    ap.add_argument("--decoding", help="decoding defaults (default: decoding.json beside the GGUF)")
    ap.add_argument("--host", default="127.0.0.1",
                    help=f"bind address (default loopback; any other needs {KEY_ENV} in the environment)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (prompt + answer)")
    ap.add_argument("--n-gpu-layers", type=int, default=None,
                    help="layers on the GPU (-1: all; default: every layer that fits when llama.cpp has a GPU "
                         "backend, else 0)")
    ap.add_argument("--max-queue", type=int, default=8,
                    help="requests that may wait while one runs; more get 503 with Retry-After (default 8)")
    ap.add_argument("--threads", type=int, default=0, help="0: the cores this process may use")
    args = ap.parse_args(argv)
    if args.max_queue < 0 or args.n_ctx < 1:
        ap.error("--max-queue must be ≥ 0 and --n-ctx ≥ 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    key = api_key(args.host)  # before anything is loaded: a refused start is quick

    import uvicorn

    from kmed.ggufio import cpu_threads

    gguf = pick_gguf(EXPORT, args.gguf)
    dec_path = Path(args.decoding) if args.decoding else gguf.parent / "decoding.json"
    if not dec_path.is_file():
        raise StageError(f"{dec_path} is missing; run `dvc repro export` (it writes the decoding defaults).")
    dec = json.loads(dec_path.read_text(encoding="utf-8"))
    if args.n_gpu_layers is None:
        n_gpu, why = gpu_layers(gguf, args.n_ctx)
    else:
        n_gpu, why = args.n_gpu_layers, "--n-gpu-layers"
    threads = args.threads or cpu_threads()
    app = build_app(gguf, dec, args.n_ctx, threads, n_gpu, key, args.max_queue)
    log.info("serving %s as model 'kmed-r1' on http://%s:%d/v1 with decoding defaults %s", gguf, args.host,
             args.port, request_defaults(dec))
    log.info("n_gpu_layers=%d (%s), n_ctx=%d, threads=%d; one request runs at a time, at most %d wait (more: 503)",
             n_gpu, why, args.n_ctx, threads, args.max_queue)
    log.info("API key: %s", f"required on every request ({KEY_ENV})" if key else "none (loopback only)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_stage(main)
