"""params.yaml schema: the real files validate; bad keys/values give one sentence naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kmed.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))]


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_real_params_validate(path: Path) -> None:
    p = load_params(path)
    # The seed's LoRA and trainer values, verbatim, in every file (but the embedded default's learning rate).
    assert (p.lora.r, p.lora.lora_alpha, p.lora.lora_dropout) == (16, 16, 0.0)
    assert set(p.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (p.lora.bias, p.lora.use_gradient_checkpointing, p.lora.random_state) == ("none", "unsloth", 3407)
    assert (p.lora.use_rslora, p.lora.loftq_config) == (False, None)
    t = p.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (
        2,
        4,
        5,
        60,
    )
    assert (t.weight_decay, t.lr_scheduler_type, t.seed, t.logging_steps) == (0.01, "linear", 3407, 10)
    # The recipe keeps the seed's learning rate; the embedded default's comes from its own sweep (a rate
    # tuned for 32B QLoRA barely teaches a 135M model in 60 steps: bench/RESULTS.md).
    assert t.learning_rate == (2e-4 if path.name != "params.yaml" else 1e-3)


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_file_sets_the_data_loss_contracts(path: Path) -> None:
    """Every params file sets the loss contracts itself (not by falling back on a code default)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))["data"]
    assert {"max_cot_loss_share", "min_cot_keep_share", "max_loss_share"} <= set(data)
    p = load_params(path).data
    assert 0 < p.max_loss_share < 0.6 and 0 < p.min_cot_keep_share < 1  # 60 % of a source lost must fail


def test_recipe_is_the_32b_production_path() -> None:
    p = load_params(ROOT / "recipes/r1-32b-medical-ko.yaml")
    assert p.model.base == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" and p.model.revision
    assert p.model.load_in_4bit and p.model.max_seq_length == 2048
    hub = {s.hub_id for s in p.data.stage1.sources + p.data.stage2.sources if s.kind == "hf"}
    assert hub == {"FreedomIntelligence/medical-o1-reasoning-SFT", "MarkrAI/KoCommercial-Dataset"}


def _write(tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return out


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r["lora"].update(r="abc"), "'lora.r'"),
        (lambda r: r["lora"].update(rr=8), "unknown key 'lora.rr'"),
        (lambda r: r["train"].update(learning_rate=-1), "'train.learning_rate'"),
        (lambda r: r.update(extra_section={}), "unknown key 'extra_section'"),
        (lambda r: r["export"].update(quantizations=["q3_x"]), "unknown quantization 'q3_x'"),
        (lambda r: r["sft_stage2"].update(init="magic"), "'sft_stage2.init'"),
        (lambda r: r["model"].update(base="org/model", revision=None), "must pin a revision"),
        (lambda r: r["model"].update(trust_remote_code=True), "trust_remote_code is refused"),
        (lambda r: r["merge"].update(dequantize_4bit=False), "would merge into 4-bit"),
        (lambda r: r["merge"].update(max_shard_size="2 potatoes"), "'merge.max_shard_size'"),
        (lambda r: r["merge"].update(probe_max_rel=1e-4), "the bf16 cast alone"),
        (lambda r: r["data"]["stage1"]["sources"][0].pop("path"), "needs a path"),
        (lambda r: r["data"].update(max_loss_share=1.5), "'data.max_loss_share'"),
        (lambda r: r["data"].update(min_cot_keep_share=-0.1), "'data.min_cot_keep_share'"),
        (lambda r: r["data"]["eval"]["koen"].update(allow_empty=True), "allow_empty is for training sources"),
        (lambda r: r["data"]["eval"].update(mcq=[]), "data.eval.mcq must name at least one source"),
        (
            lambda r: r["data"]["eval"].update(mcq=[{**r["data"]["eval"]["mcq"], "kind": "tsv"}]),
            "'data.eval.mcq.0.kind'",
        ),
        (lambda r: r["evaluate"].update(mcq_generate=True), "'evaluate.mcq_generate'"),  # was a bool
    ],
)
def test_bad_params_one_sentence(tmp_path: Path, mutate, needle: str) -> None:  # noqa: ANN001
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    msg = str(e.value)
    assert needle in msg
    assert msg.count("\n") == 0 and msg.endswith(".")
    assert str(path) in msg


@pytest.mark.parametrize("protocol", ["none", "r1", "kormedmcqa"])
def test_mcq_generate_protocols(tmp_path: Path, protocol: str) -> None:
    assert load_params(_write(tmp_path, lambda r: r["evaluate"].update(mcq_generate=protocol))).evaluate.mcq_generate == protocol
    for path in PARAM_FILES:  # generation is opt-in: CPU time (and 32B GPU time in the recipe)
        assert load_params(path).evaluate.mcq_generate == "none"


def test_trust_remote_code_allowed_when_pinned_and_listed(tmp_path: Path) -> None:
    def mutate(r):  # noqa: ANN001, ANN202
        r["model"].update(
            base="org/model",
            revision="abc123",
            trust_remote_code=True,
            trust_remote_code_allow=["org/model@abc123"],
        )

    assert load_params(_write(tmp_path, mutate)).model.trust_remote_code


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_params_are_frozen() -> None:
    p = load_params(ROOT / "params.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        p.lora.r = 8  # type: ignore[misc]


def _kmed_imports(path: Path) -> set[str]:
    """kmed modules a file imports anywhere (top level or inside functions), as repo paths."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
        )
        found |= {f"{n.replace('.', '/')}.py" for n in names if n.startswith("kmed.")}
    return found


def test_every_stage_depends_on_the_kmed_code_it_runs() -> None:
    """A kmed module a stage imports (directly or through another kmed module) must be a dep in dvc.yaml,
    or editing it would not rerun the stage."""
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, st in stages.items():
        st = st.get("do", st)  # foreach stages keep the body under `do`
        module = st["cmd"].split()[2]  # python -m stages.<name> ...
        todo, needed = [root / f"{module.replace('.', '/')}.py"], set()
        while todo:
            for dep in _kmed_imports(todo.pop()) - needed:
                needed.add(dep)
                todo.append(root / dep)
        missing = needed - set(st["deps"])
        assert not missing, f"{name}: dvc.yaml deps lack {sorted(missing)}"


# The seed (the team's design note, ../shared/seed/000_d7a4ffc09075655b.txt in the steering repo): its get_peft_model
# and TrainingArguments, transcribed value for value. recipes/DEVIATIONS.md lists every recipe value that differs,
# with its reason; this test keeps the two true to each other.
SEED = {
    "lora.r": 16, "lora.lora_alpha": 16, "lora.lora_dropout": 0.0,
    "lora.target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "lora.bias": "none", "lora.use_gradient_checkpointing": "unsloth", "lora.random_state": 3407,
    "lora.use_rslora": False, "lora.loftq_config": None,
    "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 4, "train.warmup_steps": 5,
    "train.max_steps": 60, "train.learning_rate": 2e-4, "train.bf16": True, "train.logging_steps": 10,
    "train.optim": "adamw_torch", "train.weight_decay": 0.01, "train.lr_scheduler_type": "linear", "train.seed": 3407,
    "model.base": "unsloth/DeepSeek-R1-Distill-Qwen-32B-unsloth-bnb-4bit", "model.load_in_4bit": True,
    "sft_stage2.init": "merge_then_new_adapter", "data.think_for_non_reasoning": "empty", "data.stage2_replay": 0.0,
}


def _deviations() -> dict[str, str]:
    """The keys recipes/DEVIATIONS.md's table names, with the value it says the recipe has."""
    rows = {}
    for line in (ROOT / "recipes/DEVIATIONS.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0].strip("`")] = cells[2].strip("`")
    return rows


def test_the_recipe_is_the_seed_but_for_the_listed_deviations() -> None:
    p = load_params(ROOT / "recipes/r1-32b-medical-ko.yaml")
    listed = _deviations()
    differs = {}
    for key, seed in SEED.items():
        section, name = key.split(".")
        value = getattr(getattr(p, section), name)
        value = tuple(value) if isinstance(value, list | tuple) else value
        if key == "train.bf16":  # `auto` resolves to bf16 on every card the recipe targets (the stage logs it)
            value = True if value == "auto" else value
        if value != seed:
            differs[key] = value
    assert set(differs) == set(listed), "recipes/DEVIATIONS.md must list exactly the recipe's deviations from the seed"
    for key, value in differs.items():
        assert listed[key] == str(value), f"{key}: DEVIATIONS.md says {listed[key]!r}, the recipe has {value!r}"
