"""Security: pickles are never unpickled from a model or checkpoint folder, remote code never runs
unless allow-listed, tokens never land anywhere, and a GGUF chat template is template logic only."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import zlib
from pathlib import Path

import pytest

from kmed.ggufio import check_chat_template
from kmed.io import StageError
from tests.reliability import kit
from tests.reliability.conftest import SFT_FAST, PipelineRepo
from tests.stagekit import write_params

pytestmark = pytest.mark.reliability


class _Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, torch_format: bool = False) -> None:
    """A plain pickle, or (torch_format) one in torch.save's zip container: the legacy format fails
    torch.load(mmap=True) before anything is unpickled, so only the zip one proves weights_only."""
    if torch_format:
        import torch

        torch.save(_Evil(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))


# ---------------------------------------------------------------------------------------------
# Pickles
# ---------------------------------------------------------------------------------------------
def test_pickles_planted_in_checkpoints_are_never_unpickled(sft_copy: Path, tmp_path: Path) -> None:
    """HF Trainer resume reads optimizer.pt / scheduler.pt / rng_state.pth with torch.load. The stage
    checks them with `weights_only=True` first and skips a checkpoint whose files do not load as plain
    tensors, resuming from the newest one that does (instead of crashing on every rerun)."""
    wd, marker = sft_copy, tmp_path / "PWNED"
    ck = wd / "models/checkpoints/stage1"
    _plant(ck / "checkpoint-6/optimizer.pt", marker, torch_format=True)
    _plant(ck / "checkpoint-4/rng_state.pth", marker)
    proc = kit.stage(wd, "stages.sft", "stage1", check=False)
    assert not marker.exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "models/checkpoints/stage1/checkpoint-6/optimizer.pt does not load as plain tensors" in proc.stderr
    assert (
        "models/checkpoints/stage1/checkpoint-4/rng_state.pth does not load as plain tensors" in proc.stderr
    )
    assert json.loads((wd / "metrics/sft-stage1.json").read_text())["resumed_from_step"] == 2


def test_pickle_weights_in_the_base_folder_are_refused_end_to_end(sft_copy: Path, tmp_path: Path) -> None:
    wd, marker = sft_copy, tmp_path / "PWNED"
    _plant(wd / "models/base/pytorch_model.bin", marker)
    shutil.rmtree(wd / "models/checkpoints")
    proc = kit.stage(wd, "stages.sft", "stage1", check=False)
    assert proc.returncode == 2
    (err,) = kit.error_lines(proc.stderr)
    assert (
        err
        == "models/base: refusing pickle weights 'pytorch_model.bin' (only safetensors are loaded; convert it first)."
    )
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Remote code
# ---------------------------------------------------------------------------------------------
def _custom_code_base(base: Path, marker: Path) -> None:
    """A base folder whose config asks for its own Python code (which would touch `marker`)."""
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(
        {
            "model_type": "kmedevil",
            "architectures": ["EvilForCausalLM"],
            "auto_map": {
                "AutoConfig": "modeling_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
            },
        }
    )
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class EvilConfig(Qwen2Config):\n    model_type = 'kmedevil'\n"
        "class EvilForCausalLM(Qwen2ForCausalLM):\n    config_class = EvilConfig\n"
    )


def test_remote_code_never_runs_unless_allow_listed(sft_copy: Path, tmp_path: Path) -> None:
    wd, marker = sft_copy, tmp_path / "PWNED"
    _custom_code_base(wd / "models/base", marker)
    shutil.rmtree(wd / "models/checkpoints")
    # trust_remote_code=false: refused, even with "y" typed at transformers' interactive prompt.
    proc = _run_with_stdin(wd, "y\ny\n")
    assert proc.returncode != 0 and not marker.exists()
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (err,) = kit.error_lines(proc.stderr)
    assert "needs custom code (auto_map) and model.trust_remote_code is false" in err

    # trust_remote_code=true for a folder not on the allow-list (no pinned revision): refused at params.
    write_params(wd, **{**SFT_FAST, "model.trust_remote_code": True})
    proc = kit.stage(wd, "stages.sft", "stage1", check=False)
    assert proc.returncode == 2 and not marker.exists()
    (err,) = kit.error_lines(proc.stderr)
    assert "model.trust_remote_code is refused unless model.trust_remote_code_allow lists" in err


def _run_with_stdin(wd: Path, text: str) -> subprocess.CompletedProcess[str]:
    """The stage with `text` on its stdin (what someone at a terminal would type)."""
    return subprocess.run(
        [kit.PY, "-m", "stages.sft", "stage1"],
        cwd=wd,
        env=kit.base_env(),
        input=text,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------
R1_DISTILL = (  # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B's tokenizer_config.json chat_template
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{% set content = message['content'] %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>' + content + '<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{% endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if content is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string else tool['function']['arguments'] | tojson) + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{content + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string else tool['function']['arguments'] | tojson) + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string else tool['function']['arguments'] | tojson) + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"""
)
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MSGS = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
_NEVER = "{% if messages|length > 99 %}"  # a branch the sandboxed render never takes
BAD = {
    "globals via cycler": ("{{ cycler.__init__.__globals__ }}" + _MSGS, "reads private attribute '__"),
    "os via lipsum, untaken branch": (
        _NEVER + "{{ lipsum.__globals__.os.popen('id').read() }}{% endif %}" + _MSGS,
        "private attribute '__globals__'",
    ),
    "include": ("{% include 'system.jinja' %}" + _MSGS, "uses include"),
    "import": ("{% import 'macros.jinja' as m %}" + _MSGS, "uses import"),
    "extends": ("{% extends 'base.jinja' %}", "uses extends"),
    "arbitrary function": ("{{ joiner() }}" + _MSGS, "calls 'joiner'"),
    "format string": ("{% for m in messages %}{{ m.content.format(m) }}{% endfor %}", "calls 'format'"),
    "attr filter, untaken branch": (_NEVER + "{{ messages|attr('__class__') }}{% endif %}" + _MSGS, "'attr'"),
    "subscript to a dunder, untaken branch": (
        _NEVER + "{{ cycler['__init__'] }}{% endif %}" + _MSGS,
        "'__init__'",
    ),
    "map attribute to a dunder, untaken branch": (
        _NEVER + "{{ messages|map(attribute='__class__')|list }}{% endif %}" + _MSGS,
        "'__class__'",
    ),
    "drops the user's message": ("{{ bos_token }}", "renders without the user's message"),
}


@pytest.mark.parametrize("name", ["ChatML (SmolLM2)", "DeepSeek-R1-Distill-Qwen", "Qwen3"])
def test_normal_chat_templates_pass(name: str, smol_tokenizer) -> None:  # noqa: ANN001
    template = {
        "ChatML (SmolLM2)": smol_tokenizer.chat_template,
        "DeepSeek-R1-Distill-Qwen": R1_DISTILL,
        "Qwen3": QWEN3,
    }[name]
    check_chat_template(template)
    check_chat_template(CHATML)


@pytest.mark.parametrize("name", list(BAD))
def test_chat_template_with_non_template_content_is_refused(name: str) -> None:
    template, needle = BAD[name]
    with pytest.raises(StageError) as exc:
        check_chat_template(template)
    msg = str(exc.value)
    assert needle in msg and msg.startswith("chat template ") and msg.endswith("."), msg


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
CANARY = {
    "HF_TOKEN": "hf_CANARYkmedReliability8c1f0a2b3c4d5e6f",
    "AWS_ACCESS_KEY_ID": "AKIACANARYKMED0000000",
    "AWS_SECRET_ACCESS_KEY": "CANARYkmedAwsSecret/9f8e7d6c5b4a3210zyxw",
    # *_KEY / *_API_KEY / *_KEY_ID names whose values have no token shape: known by the variable's name only.
    "HF_KEY": "canary-kmed-reliability-hf-key",
    "KMED_SERVICE_KEY_ID": "canary-kmed-reliability-key-id",
    "OPENAI_API_KEY": "canary-kmed-reliability-openai-api-key",
}
SECRETS = (CANARY["HF_TOKEN"], CANARY["AWS_SECRET_ACCESS_KEY"], CANARY["HF_KEY"], CANARY["KMED_SERVICE_KEY_ID"])
# A token pasted into params.yaml (no variable holds it): it is in params.yaml and dvc.lock by the user's
# hand, but MLflow records the key with the value redacted by its shape. The same for the OPENAI_API_KEY
# canary, pasted into another param: redacted because the environment holds it under a *_API_KEY name.
PASTED = "hf_PASTEDkmedReliability0f1e2d3c4b5a69788796"


def _scan(root: Path, needles: tuple[str, ...]) -> dict[str, list[str]]:
    """Which files under `root` contain which needle, raw or zlib-inflated (git objects)."""
    raw = [n.encode() for n in needles]
    hits: dict[str, list[str]] = {}
    for p in root.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        blobs = [data]
        if "/.git/objects/" in str(p) and "/pack/" not in str(p):
            blobs.append(zlib.decompress(data))
        for n, b in zip(needles, raw, strict=True):
            if any(b in blob for blob in blobs):
                hits.setdefault(n, []).append(str(p.relative_to(root)))
    return hits


def test_tokens_never_reach_mlflow_lock_params_logs_card_checkpoints_or_git(
    pipeline_repo_session: PipelineRepo, tmp_path: Path
) -> None:
    """The whole chain through `dvc repro` (preprocess, sft-stage1, merge@stage1, export) with a canary
    HF_TOKEN and AWS secret in the environment, a token pasted into a param, and MLflow on (local sqlite
    store), then committed. Each stage's MLflow run holds every resolved params key."""
    repo = PipelineRepo(tmp_path / "repo")
    shutil.copytree(pipeline_repo_session.path, repo.path, symlinks=True)
    repo.params(
        **{
            "sft_stage1.max_steps": 2,
            "train.save_steps": 1,
            "train.save_total_limit": 2,
            "export.quantizations": ["q8_0"],
            "export.min_token_agreement": {"q8_0": 0.8},
            "export.max_ppl_delta": {"q8_0": 0.05},
            "export.min_chat_format_ok": 0.0,  # a 2-step model writes no R1 answer yet
            "generate.do_sample": False,  # and greedy, it stops at EOS (the chat check below)
            "mlflow.enabled": True,
            "export.hub_repo_adapter": f"someone/{PASTED}",
            "export.hub_repo_merged": f"someone/{CANARY['OPENAI_API_KEY']}",
        }
    )
    env = {**CANARY, "KMED_MLFLOW": "1"}
    logs = [repo.dvc("repro", "-s", "-f", "preprocess", "sft-stage1", "merge@stage1", **env)]
    shutil.copytree(repo.path / "models/stage1/merged", repo.path / "models/stage2/merged")
    (repo.path / "metrics/eval.json").write_text("{}\n")
    logs.append(repo.dvc("repro", "-s", "export", **env))
    kit.git(repo.path, "add", "-A")
    kit.git(repo.path, "commit", "-qm", "results")
    (repo.path / "control.txt").write_text("CONTROL-9d1e\n")  # proves the scan reads git's compressed objects
    kit.git(repo.path, "add", "control.txt")
    kit.git(repo.path, "commit", "-qm", "control")
    (repo.path / "control.txt").unlink()

    # What must have been written for the check to mean anything.
    p = repo.path
    assert (p / "models/export/README.md").exists() and list(
        p.glob("models/checkpoints/stage1/*/training_args.bin")
    )
    from kmed.config import flat, load_params, resolved_dict

    keys = set(flat(resolved_dict(load_params(p / "params.yaml"))))
    with sqlite3.connect(p / "mlruns/mlflow.db") as db:
        stage_runs = db.execute("select run_uuid, name from runs where name like '%/%'").fetchall()
        assert sorted(n for _, n in stage_runs) == ["workspace/export", "workspace/merge-stage1", "workspace/sft-stage1"]
        for run, name in stage_runs:  # every resolved params key, in every stage's run
            params = dict(db.execute("select key, value from params where run_uuid = ?", (run,)).fetchall())
            assert set(params) == keys, (name, keys ^ set(params))
            assert params["export.hub_repo_adapter"] == "someone/[redacted token]"
            assert params["export.hub_repo_merged"] == "someone/[redacted $OPENAI_API_KEY]"
    assert "CONTROL-9d1e" in _scan(p / ".git", ("CONTROL-9d1e",))

    hits = _scan(p, SECRETS)
    assert not hits, hits
    assert not _scan(p / "mlruns", (PASTED, CANARY["OPENAI_API_KEY"]))  # the store and its artifacts
    for proc in logs:
        for s in SECRETS:
            assert s not in proc.stdout and s not in proc.stderr
