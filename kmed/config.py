"""params.yaml schema: frozen pydantic models that refuse unknown keys, plus cross-field checks.

Every stage calls `load_params()` first; a bad key or value exits non-zero with one sentence that
names it, before any output is touched (all stage outputs are `persist: true` in dvc.yaml and are
replaced atomically, so DVC does not delete them before the command runs either).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_BASE = "embedded:smollm2-135m-instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_TYPES = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


class ParamsError(ValueError):
    """A params file that does not validate; str() is one sentence naming the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCfg(_Frozen):
    base: str = EMBEDDED_BASE
    revision: str | None = None
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    max_seq_length: int = Field(2048, ge=32, le=131072)
    load_in_4bit: bool = True
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    trust_remote_code: bool = False
    trust_remote_code_allow: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _checks(self) -> ModelCfg:
        is_hub = not self.base.startswith(EMBEDDED_BASE) and _looks_like_hub_id(self.base)
        if is_hub and not self.revision:
            raise ValueError(f"model.revision must pin a revision for the Hub model {self.base!r}")
        if self.trust_remote_code:
            pinned = f"{self.base}@{self.revision}"
            if pinned not in self.trust_remote_code_allow:
                raise ValueError(
                    f"model.trust_remote_code is refused unless model.trust_remote_code_allow lists {pinned!r}"
                )
        return self


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not Path(s).exists()


class LoraCfg(_Frozen):
    # The seed's get_peft_model arguments, verbatim.
    r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = LORA_TARGETS
    bias: Literal["none", "all", "lora_only"] = "none"
    use_gradient_checkpointing: Literal["unsloth", True, False] = "unsloth"
    random_state: int = 3407
    use_rslora: bool = False
    loftq_config: dict[str, Any] | None = None

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one module")
        return v


class TrainCfg(_Frozen):
    # The seed's TrainingArguments, verbatim.
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    warmup_steps: int = Field(5, ge=0)
    max_steps: int = Field(60, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    bf16: Literal["auto", True, False] = "auto"
    logging_steps: int = Field(10, ge=1)
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: int = 3407
    max_grad_norm: float = Field(1.0, gt=0)
    # Ours (not in the seed): checkpoints, packing, guards.
    save_steps: int = Field(20, ge=1)
    save_total_limit: int = Field(3, ge=1)
    packing: Literal["auto", "padding_free", "bfd", "none"] = "auto"
    nan_patience: int = Field(2, ge=1)


class SourceCfg(_Frozen):
    name: str
    kind: Literal["hf", "jsonl", "json", "csv", "xlsx", "parquet"]
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    config: str | None = None
    split: str = "train"
    sheet: str | int | None = None
    # kind csv/xlsx: the 1-based row that holds the column names (a title row above them is common in
    # exported workbooks); null = the first non-empty row of each sheet, the first line of a CSV.
    header_row: int | None = Field(None, ge=1)
    # kind json (or jsonl holding a JSON document): the key of the top-level object that holds the
    # records list; null = the array itself, or the object's only list-of-objects value.
    records_key: str | None = None
    # schema field -> column name; kind csv/xlsx also take a 1-based column number (2 = column B), which
    # picks one of two columns with the same name.
    fields: dict[str, str | int] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0)
    task: Literal["reasoning", "instruction", "translation", "mcq", "pairs"]
    # A training source that ends with no records (every row blank, a duplicate, an eval item or over
    # length) fails preprocess unless this says it may (then it is logged as a warning).
    allow_empty: bool = False

    @model_validator(mode="after")
    def _where(self) -> SourceCfg:
        if self.kind == "hf":
            if not self.hub_id or not self.revision:
                raise ValueError(f"source {self.name!r} of kind hf needs hub_id and a pinned revision")
        elif not self.path:
            raise ValueError(f"source {self.name!r} of kind {self.kind} needs a path")
        if self.records_key is not None and self.kind not in ("json", "jsonl"):
            raise ValueError(f"source {self.name!r}: records_key is for kind json, not {self.kind}")
        if self.header_row is not None and self.kind not in ("csv", "xlsx"):
            raise ValueError(f"source {self.name!r}: header_row is for kind csv or xlsx, not {self.kind}")
        numbered = [f for f, c in self.fields.items() if isinstance(c, int)]
        if numbered and self.kind not in ("csv", "xlsx"):
            raise ValueError(
                f"source {self.name!r}: fields maps {', '.join(numbered)} to a column number, which only kind "
                f"csv or xlsx takes (not {self.kind})"
            )
        if any(isinstance(c, int) and c < 1 for c in self.fields.values()):
            raise ValueError(f"source {self.name!r}: column numbers in fields start at 1")
        return self


class StageDataCfg(_Frozen):
    sources: tuple[SourceCfg, ...]
    translation_direction: Literal["ko2en", "en2ko", "both"] = "both"


class EvalDataCfg(_Frozen):
    # One source or a list of them (e.g. KorMedMCQA's CSVs from two releases), read in order and
    # de-duplicated together.
    mcq: SourceCfg | tuple[SourceCfg, ...]
    koen: SourceCfg

    @property
    def mcq_sources(self) -> tuple[SourceCfg, ...]:
        return self.mcq if isinstance(self.mcq, tuple) else (self.mcq,)

    @model_validator(mode="after")
    def _sources(self) -> EvalDataCfg:
        names = [s.name for s in self.mcq_sources]
        if not names:
            raise ValueError("data.eval.mcq must name at least one source")
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval.mcq source names must be unique (got {', '.join(names)})")
        for s in (*self.mcq_sources, self.koen):
            if s.allow_empty:
                raise ValueError(
                    f"eval source {s.name!r}: allow_empty is for training sources (an eval set needs items)"
                )
        return self


class DataCfg(_Frozen):
    system_prompt: str
    # seed: the seed's R1 prompt (### Instruction / ### Question / ### Response), exported as the chat
    # template; chat_template: the base model's own chat template (what TRL and Axolotl do). kmed/prompt.py
    prompt_format: Literal["seed", "chat_template"] = "seed"
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 3407
    # Records longer than model.max_seq_length tokens: drop them, or shorten the CoT to fit. The answer
    # is never cut: a record whose prompt + answer does not fit is dropped either way.
    overlong: Literal["drop", "truncate"] = "drop"
    # truncate keeps at least this many CoT tokens; a record that would keep fewer is dropped (a cut
    # <think> block teaches the model to skip reasoning). 0 allows an emptied CoT.
    min_cot_tokens: int = Field(32, ge=0)
    # The stage fails when more than this share of its reasoning records lose their CoT to the length
    # limit (dropped as overlong, either mode): max_seq_length is then too short for the data.
    max_cot_loss_share: float = Field(0.1, ge=0, le=1)
    # truncate also drops a record whose CoT would keep less than this share of its tokens (a CoT cut to
    # a tenth ends mid-sentence and teaches reasoning that stops short); such records count as CoT lost.
    min_cot_keep_share: float = Field(0.25, ge=0, le=1)
    # Every source, every task: the stage fails when a source loses more than this share of its records
    # (rows with an empty required cell or non-text values, rows equal to an eval item, records over the
    # length limit, emptied CoTs; blank rows, duplicates and weight < 1 are not losses), or ends with none
    # unless the source sets allow_empty.
    max_loss_share: float = Field(0.2, ge=0, le=1)
    # Korean resident registration / phone numbers: mask them, fail the stage, or leave (not advised).
    pii: Literal["mask", "fail", "off"] = "mask"
    # Non-reasoning records (instructions, translations) get an empty <think></think> so the model keeps the
    # R1 output format. empty: the block is trained, as the seed renders them; masked: the block stays in the
    # input but is part of the masked prompt (no loss), so stage 2 does not learn to leave <think> empty;
    # none: no block at all.
    think_for_non_reasoning: Literal["empty", "masked", "none"] = "empty"
    # Share of stage 2's training records drawn from stage 1's *training* split (reasoning records with their
    # CoT), so stage 2 keeps practising reasoning; 0 = none. Never from a val split: no eval item leaks.
    stage2_replay: float = Field(0.0, ge=0, lt=1)
    max_xlsx_mb: float = Field(50, gt=0)
    # A text field holding a number, boolean, date, list or object (a JSON number, a numeric xlsx cell):
    # fail lists them in one error; count drops such rows as a loss of the source (max_loss_share applies).
    # MCQ answers, ids and options may be numbers.
    non_text: Literal["fail", "count"] = "fail"
    # Translation/pairs sources: at least this share of the ko values must be mostly Hangul and of the en
    # values mostly Latin, else the mapping is refused (swapped columns, an ID column); 0 turns it off.
    min_lang_share: float = Field(0.5, ge=0, le=1)
    stage1: StageDataCfg
    stage2: StageDataCfg
    eval: EvalDataCfg


SftInit = Literal["base", "merge_then_new_adapter", "continue_adapter", "new_adapter_on_stage1"]


class SftStageCfg(_Frozen):
    # How the stage's LoRA starts (stages/sft.py, stage_inputs): base model; the previous stage's merged
    # weights with a fresh adapter (the seed's way; re-quantized under load_in_4bit); the previous stage's
    # adapter trained further; or the base with the previous stage's adapter frozen and a new one beside it.
    init: SftInit = "base"
    max_steps: int | None = Field(None, ge=1)


class Sft2Cfg(SftStageCfg):
    init: SftInit = "new_adapter_on_stage1"
    # sft-stage2 measures stage 1's val loss on the model it starts from before its first step and fails when
    # less than this share of stage 1's val-loss gain is left (metrics/sft-stage2.json: stage1_retained).
    min_stage1_retained: float = Field(0.9, ge=0, le=1)


class MergeCfg(_Frozen):
    save_dtype: Literal["bf16", "fp16"] = "bf16"
    # A 4-bit QLoRA base is always merged into its dequantized 16-bit weights; false refuses.
    dequantize_4bit: bool = True
    # Also bounds the merge's memory: one output shard is held before it is written.
    max_shard_size: str = "2GB"
    parity_max_abs: float = Field(0.05, gt=0)
    parity_max_kl: float = Field(1e-3, gt=0)
    # Worst relative error |W'x - (Wx + s*B(Ax))| / |Wx + s*B(Ax)| over every merged module (fixed random
    # probes, W' read back from the written file). The 16-bit cast alone costs up to 2^-8 (bf16) per weight.
    probe_max_rel: float = Field(0.01, gt=0, lt=1)
    # Full-model logits parity loads base+adapter in fp32 (~4 bytes/param): run it up to this many
    # billion parameters, skip it (with a warning and metrics parity_skipped: 1) above.
    parity_max_params_b: float = Field(2.0, ge=0)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        size_bytes(v)
        return v

    @model_validator(mode="after")
    def _probe_bound(self) -> MergeCfg:
        floor = {"bf16": 2.0**-8, "fp16": 2.0**-11}[self.save_dtype]
        if self.probe_max_rel < floor:
            raise ValueError(
                f"merge.probe_max_rel must be at least {floor:.3g}: the {self.save_dtype} cast alone "
                "reaches that relative error"
            )
        return self


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def size_bytes(size: str) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500 * 2**20 (transformers' max_shard_size units, bytes only)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _SIZE_UNITS or int(m.group(1)) < 1:
        raise ValueError(f"{size!r} is not a size like 2GB, 500MB or 1GiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class GenerateCfg(_Frozen):
    """Decoding defaults carried by every artifact (generation_config.json, GGUF, Modelfile, card, serve)
    and used by evaluate's sampled generations. `auto` = the base's generation_config.json, else R1's."""

    do_sample: bool | Literal["auto"] = "auto"
    temperature: float | Literal["auto"] = Field("auto")
    top_p: float | Literal["auto"] = Field("auto")
    top_k: int | Literal["auto"] = "auto"   # 0 = no top-k cut
    max_new_tokens: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> GenerateCfg:
        if self.temperature != "auto" and not 0 < self.temperature <= 5:
            raise ValueError("generate.temperature must be in (0, 5] (for greedy decoding set do_sample: false)")
        if self.top_p != "auto" and not 0 < self.top_p <= 1:
            raise ValueError("generate.top_p must be in (0, 1]")
        if self.top_k != "auto" and self.top_k < 0:
            raise ValueError("generate.top_k must be 0 (no cut) or more")
        return self


class EvaluateCfg(_Frozen):
    models: tuple[Literal["base", "stage1", "stage2"], ...] = ("base", "stage1", "stage2")
    # sampled: `samples` seeded samples per prompt under the `generate` defaults (how R1 models are used;
    # pass@1 = the mean over samples); greedy: one deterministic decode (like-for-like PR comparisons).
    decoding: Literal["sampled", "greedy"] = "sampled"
    samples: int = Field(4, ge=1)
    # Seeds the MCQ sample and the sampled generations (sample j uses seed + j); not train.seed, so
    # changing the training seed does not change what is evaluated.
    seed: int = 3407
    mcq_limit: int | None = Field(None, ge=1)
    # Besides the letters' log-likelihood (always): none; r1 = our prompt, the model reasons, then the
    # letter it commits to is extracted; kormedmcqa = lm-evaluation-harness's kormedmcqa task (its prompt,
    # stop strings and answer filter), zero-shot: comparable with lm-eval's zero-shot kormedmcqa numbers.
    # Both generate up to max_new_tokens per item (slow on a CPU).
    mcq_generate: Literal["none", "r1", "kormedmcqa"] = "none"
    # A medical generation counts as reasoning (`reasoning`, and `format_ok` on medical prompts) when its
    # <think> block holds at least this many tokens of the model's tokenizer; an empty block is well-formed, not
    # reasoning. Export's chat check uses the same bar.
    min_think_tokens: int = Field(16, ge=1)
    gen_limit: int = Field(8, ge=0)
    translation_limit: int = Field(20, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    val_limit: int | None = Field(None, ge=1)
    # Rows per batch of generation (and of the val/MCQ forwards). auto: on CUDA the largest generation batch
    # whose KV cache fits the memory left after the model is placed, at most 32 (kmed.lm.auto_batch_size;
    # val/MCQ at 4, where the batch does not change the rate); on the CPU 8.
    batch_size: int | Literal["auto"] = 8

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("evaluate.batch_size must be >= 1 or auto")
        return v


class ExportCfg(_Frozen):
    quantizations: tuple[str, ...] = ("q4_k_m",)
    # GGUF parity: greedy tokens that must match the merged HF model, and the allowed perplexity
    # rise of each quant over f16.
    parity_tokens: int = Field(16, ge=1)
    # Work of the perplexity checks (HF and every GGUF): held-out texts and tokens per text.
    check_texts: int = Field(8, ge=1)
    check_max_tokens: int = Field(256, ge=8)
    # A chat completion of each GGUF must end at EOS (proves the chat template and stop token). Off
    # only for random-weight benchmarks (bench/gpu_pipeline.py), which never say EOS.
    chat_must_stop: bool = True
    # Share of the 4 seeded chat completions (llama.cpp, the GGUF's template, the decoding defaults) that
    # must be one <think>…</think> block and an answer ending at EOS. 0 for untrained/random-weight models.
    min_chat_format_ok: float = Field(0.5, ge=0, le=1)
    min_token_agreement: dict[str, float] = Field(default_factory=dict)
    max_ppl_delta: dict[str, float] = Field(default_factory=dict)
    push_to_hub: bool = False
    hub_repo_adapter: str | None = None
    hub_repo_merged: str | None = None
    hub_repo_gguf: str | None = None
    hub_private: bool = True

    @field_validator("quantizations")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [q for q in v if q not in QUANT_TYPES]
        if bad:
            raise ValueError(f"unknown quantization {bad[0]!r}; allowed: {', '.join(QUANT_TYPES)}")
        return v

    @model_validator(mode="after")
    def _push(self) -> ExportCfg:
        if self.push_to_hub and not (self.hub_repo_merged or self.hub_repo_gguf or self.hub_repo_adapter):
            raise ValueError("export.push_to_hub needs at least one of hub_repo_adapter/merged/gguf")
        return self


class MlflowCfg(_Frozen):
    enabled: bool = True
    # Local file store inside the repo unless MLFLOW_TRACKING_URI points elsewhere.
    tracking_uri: str = "mlruns"
    experiment: str = "kmed-r1"


class DoctorCfg(_Frozen):
    # Pre-flight check at the start of sft/merge/evaluate/export (kmed/doctor.py): fail stops the stage
    # (exit 2) when the estimated disk/RAM/VRAM need exceeds what is free; warn logs it and goes on.
    mode: Literal["fail", "warn", "off"] = "fail"
    # Multiplier on every estimate before it is compared with what is free (the estimates are approximate).
    headroom: float = Field(1.1, ge=1.0, le=10.0)


class Params(_Frozen):
    model: ModelCfg = ModelCfg()
    lora: LoraCfg = LoraCfg()
    train: TrainCfg = TrainCfg()
    data: DataCfg
    sft_stage1: SftStageCfg = SftStageCfg()
    sft_stage2: Sft2Cfg = Sft2Cfg()
    merge: MergeCfg = MergeCfg()
    generate: GenerateCfg = GenerateCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    export: ExportCfg = ExportCfg()
    mlflow: MlflowCfg = MlflowCfg()
    doctor: DoctorCfg = DoctorCfg()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.sft_stage1.init != "base":
            raise ValueError("sft_stage1.init must be 'base' (there is no earlier stage)")
        if self.sft_stage2.init == "new_adapter_on_stage1" and self.lora.loftq_config:
            raise ValueError("sft_stage2.init new_adapter_on_stage1 starts its new LoRA at zero; loftq_config "
                             "would initialise it from the base instead")
        if self.model.load_in_4bit and not self.merge.dequantize_4bit:
            raise ValueError(
                "merge.dequantize_4bit=false with model.load_in_4bit=true would merge into 4-bit weights"
            )
        return self

    def sft(self, stage: str) -> SftStageCfg:
        return {"stage1": self.sft_stage1, "stage2": self.sft_stage2}[stage]


def _loc(err: dict[str, Any]) -> str:
    # Validator and union-branch tags ("function-after[...]", "tuple[...]") are not keys the user wrote.
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tuple[")))


# A union (data.eval.mcq: one source or a list) reports each branch the input is not, before the real error.
_BRANCH_MISMATCH = ("model_type", "tuple_type")


def _sentence(path: Path, exc: ValidationError) -> str:
    errs = exc.errors()
    err = next((e for e in errs if e["type"] not in _BRANCH_MISMATCH), errs[0])
    key = _loc(err)
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key {key!r}."
    if err["type"] == "missing":
        return f"{path}: missing key {key!r}."
    got = err.get("input")
    got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
    where = f"key {key!r}" if key else "params"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {where}: {msg}{got_s}."


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise ParamsError with one sentence on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections.")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_sentence(path, e)) from None


def resolved_dict(p: BaseModel) -> dict[str, Any]:
    return p.model_dump(mode="json")


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys (for MLflow and the model card)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out
