"""The whole pipeline through real DVC, on the embedded default with fewer steps, in a fresh git repo.

The seed's 60 steps run in `make repro` (timed in bench/RESULTS.md); here each SFT stage takes 2 steps
so the suite stays inside CI's budget. Everything else — DVC, the stages, llama.cpp — is the real thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.stagekit import ROOT

pytestmark = pytest.mark.integration

FAST = {
    ("sft_stage1", "max_steps"): 2, ("sft_stage2", "max_steps"): 2,
    ("evaluate", "mcq_limit"): 4, ("evaluate", "gen_limit"): 2, ("evaluate", "translation_limit"): 2,
    ("evaluate", "max_new_tokens"): 12, ("evaluate", "samples"): 2, ("export", "min_chat_format_ok"): 0,
    ("export", "chat_must_stop"): False,  # 2-step models, sampled: the stop and the R1 format are tests/test_serve.py's
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    e.update({"KMED_MLFLOW": "0", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""})
    return e


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tree_digest(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:  # noqa: ANN001
    """A fresh clone of the tracked tree with FAST params, after one complete `dvc repro`."""
    repo = tmp_path_factory.mktemp("pipeline")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src, dst = ROOT / rel, repo / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    for stale in ("dvc.lock",):
        (repo / stale).unlink(missing_ok=True)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for (sec, key), v in FAST.items():
        raw[sec][key] = v
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(repo, *cmd)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")
    return repo


def test_repro_writes_models_metrics_and_lock(repo: Path) -> None:
    for p in ("models/base/model.safetensors", "models/stage1/adapter/adapter_model.safetensors",
              "models/stage1/merged/config.json", "models/stage2/merged/config.json",
              "models/export/model-q4_k_m.gguf", "models/export/model-q8_0.gguf", "models/export/README.md",
              "models/export/Modelfile", "dvc.lock", "reports/eval.md", "reports/data_report.md"):
        assert (repo / p).exists(), p
    ev = json.loads((repo / "metrics/eval.json").read_text())
    for model in ("base", "stage1", "stage2"):
        for k in ("val1_loss", "val2_loss", "mcq_acc", "format_ok", "eos_stop", "chrf_ko2en", "chrf_en2ko"):
            assert f"{model}.{k}" in ev, f"{model}.{k}"
    for stage in ("stage1", "stage2"):  # merged logits == base+adapter logits (bounds in params `merge`)
        mg = json.loads((repo / f"metrics/merge-{stage}.json").read_text())
        assert mg["parity_max_abs"] < 0.05 and mg["parity_kl"] < 1e-3
    ex = json.loads((repo / "metrics/export.json").read_text())
    assert ex["q4_k_m.chat_prompt_match"] == 1 and ex["q8_0.chat_prompt_match"] == 1
    assert ex["q8_0.token_agreement"] >= 0.8
    shown = sh(repo, "dvc", "metrics", "show").stdout
    assert "stage2.mcq_acc" in shown and "q4_k_m.ppl" in shown


def test_gguf_metadata_checks_out(repo: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo / "models/stage2/merged")
    for q in ("q4_k_m", "q8_0"):
        r = GGUFReader(str(repo / f"models/export/model-{q}.gguf"))
        f = {k: r.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.eos_token_id",
                                                  "tokenizer.chat_template", "tokenizer.ggml.model",
                                                  "tokenizer.ggml.pre", "GGUF.tensor_count")}
        assert f["general.architecture"] == "llama"
        assert f["GGUF.tensor_count"] == len(r.tensors) == 272
        assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert f["tokenizer.chat_template"] == tok.chat_template
        assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "smollm")


def test_every_artifact_prompts_as_trained_and_states_the_same_decoding(repo: Path) -> None:
    """HF apply_chat_template of the merged folders and llama.cpp's chat completion on each GGUF render the
    training prompt (render_prompt), token for token; generation_config.json, the GGUF metadata, the
    Modelfile and the model card state the same decoding defaults."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from kmed.config import load_params
    from kmed.ggufio import isolated
    from kmed.prompt import render_prompt

    params = load_params(repo / "params.yaml")
    q = "당뇨병 환자에게 메트포르민을 처방할 때 주의할 점은 무엇인가요?"
    msgs = [{"role": "user", "content": q}]
    want: list[int] = []
    for stage in ("stage1", "stage2"):
        tok = AutoTokenizer.from_pretrained(repo / f"models/{stage}/merged")
        want = tok(render_prompt(params.data.system_prompt, q), add_special_tokens=True)["input_ids"]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_prompt(
            params.data.system_prompt, q)
        assert list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]) == want
        gen = json.loads((repo / f"models/{stage}/merged/generation_config.json").read_text())
        assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["top_k"]) == (True, 0.6, 0.95, 0)
    dec = json.loads((repo / "models/export/decoding.json").read_text())
    assert dec == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0,
                   "max_new_tokens": params.generate.max_new_tokens}
    for quant in ("q4_k_m", "q8_0"):
        path = repo / f"models/export/model-{quant}.gguf"
        fields = GGUFReader(str(path)).fields
        assert abs(fields["general.sampling.temp"].contents() - 0.6) < 1e-6
        assert abs(fields["general.sampling.top_p"].contents() - 0.95) < 1e-6
        assert fields["general.sampling.top_k"].contents() == 0
        _, fed = isolated(_chat_in_worker, path, msgs, dec)
        assert fed == want, quant
    modelfile = (repo / "models/export/Modelfile").read_text()
    for line in ("PARAMETER temperature 0.6", "PARAMETER top_p 0.95", "PARAMETER top_k 0",
                 f"PARAMETER num_predict {params.generate.max_new_tokens}"):
        assert line in modelfile
    assert "sampling at temperature 0.6, top_p 0.95, top_k 0" in (repo / "models/export/README.md").read_text()
    ex = json.loads((repo / "metrics/export.json").read_text())
    assert ex["q4_k_m.chat_prompt_match"] == 1 and ex["q8_0.chat_prompt_match"] == 1


def _chat_in_worker(path: Path, msgs: list[dict[str, str]], dec: dict) -> tuple[dict, list[int]]:
    from kmed.ggufio import chat_completion, open_gguf

    llm = open_gguf(path)
    try:
        return chat_completion(llm, msgs, {**dec, "max_new_tokens": 4})
    finally:
        llm.close()


def test_make_serve_answers_an_openai_client_on_the_exported_gguf(repo: Path) -> None:
    """`make serve`'s command on the pipeline's own q4_k_m GGUF: an OpenAI chat request (and a streamed one) is
    answered from the exported model with the training prompt. (These models trained 2 steps: the R1 answer
    format itself is checked on a model trained to write it, tests/test_serve.py, and on the embedded default's
    60-step model in bench/RESULTS.md.)"""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from kmed.config import load_params
    from kmed.prompt import render_prompt
    from tests.stagekit import free_port, stop_process, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kmed.serve", "--port", str(port), "--n-ctx", "1024"], cwd=repo,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout=120)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        q = "What is the antidote for acetaminophen overdose?"
        r = client.chat.completions.create(model="kmed-r1", messages=[{"role": "user", "content": q}], max_tokens=16)
        tok = AutoTokenizer.from_pretrained(repo / "models/stage2/merged")
        system = load_params(repo / "params.yaml").data.system_prompt
        assert r.usage.prompt_tokens == len(tok(render_prompt(system, q), add_special_tokens=True)["input_ids"])
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content is not None
        chunks = list(client.chat.completions.create(model="kmed-r1", messages=[{"role": "user", "content": q}],
                                                     max_tokens=8, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        stop_process(proc)


def test_second_repro_is_up_to_date(repo: Path) -> None:
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert "up to date" in out


def test_bad_params_fail_with_one_sentence_and_touch_nothing(repo: Path) -> None:
    before = tree_digest(repo / "models", repo / "metrics")
    # lora.rr=8 is refused by DVC itself (it only overrides existing keys); +lora.rr=8 adds the key,
    # and the stage's schema refuses it.
    for setting, needle in (("lora.r=abc", "'lora.r'"), ("lora.rr=8", "'lora.rr'"),
                            ("+lora.rr=8", "unknown key 'lora.rr'")):
        proc = sh(repo, "dvc", "exp", "run", "-S", setting, check=False)
        assert proc.returncode != 0
        assert needle in proc.stdout + proc.stderr
        sh(repo, "git", "checkout", "--", "params.yaml")
    assert tree_digest(repo / "models", repo / "metrics") == before


def test_export_quantizations_change_reruns_export_only(repo: Path) -> None:
    proc = sh(repo, "dvc", "exp", "run", "-S", "export.quantizations=[q8_0]")
    ran = [line for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'export':"], ran
    assert not (repo / "models/export/model-q4_k_m.gguf").exists()
    sh(repo, "dvc", "exp", "apply", "HEAD", check=False)
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout", "-f")


def test_lora_r32_reruns_from_sft_stage1_and_shows_in_exp_show(repo: Path) -> None:
    proc = sh(repo, "dvc", "exp", "run", "-n", "r32", "-S", "lora.r=32")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert "prepare-base" not in ran and "preprocess" not in ran
    assert ran[0] == "sft-stage1" and {"sft-stage2", "merge@stage1", "merge@stage2", "evaluate", "export"} <= set(ran)
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert '"r": 32' in text and "stage2.mcq_acc" in text


def _ran(text: str) -> list[str]:
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage")]


def test_dry_run_names_the_stages_an_experiment_would_rerun_and_runs_nothing(repo: Path) -> None:
    """What `dvc exp run --dry -S lora.r=32` is for, the way that works with DVC 3.67 (README, "Params and
    experiments"): `dvc exp run --dry` implies `--temp`, and its temp copy neither checks out the cached outputs
    nor skips the run-cache lookup, which hashes the missing models/base and fails (checked here too, so a DVC
    that fixes it is noticed). `dvc repro --dry` on the edited params names the first stage to rerun and runs none."""
    sh(repo, "git", "checkout", "--", ".")  # back to the committed run (an earlier test applied lora.r=32)
    sh(repo, "dvc", "checkout", "-f")
    before = tree_digest(repo / "models", repo / "metrics")
    broken = sh(repo, "dvc", "exp", "run", "--dry", "-S", "lora.r=24", check=False)
    assert broken.returncode != 0 and "models/base" in broken.stdout + broken.stderr
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["lora"]["r"] = 24
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    try:
        proc = sh(repo, "dvc", "repro", "--dry")
    finally:
        sh(repo, "git", "checkout", "--", "params.yaml")
    # A dry run checks each stage against the workspace as it is: it names the stages whose own deps changed (the
    # lora params: both sft stages and export), not the merges below them, whose inputs only a real run changes.
    ran = _ran(proc.stdout + proc.stderr)
    assert ran and ran[0] == "sft-stage1", proc.stdout + proc.stderr
    assert {"sft-stage1", "sft-stage2"} <= set(ran)
    assert "prepare-base" not in ran and "preprocess" not in ran
    assert "INFO stages.sft" not in proc.stdout + proc.stderr  # printed, not executed
    assert tree_digest(repo / "models", repo / "metrics") == before


def test_exp_queue_runs_in_a_worker_and_shows_metrics(repo: Path) -> None:
    """`dvc exp run --queue` + `dvc queue start`: the experiment runs in a background worker in a temp copy of the
    repo, where DVC checks out the cached outputs (base, data, adapters, merged models); an export-only change
    reruns export alone there (before session 7 it also reran sft-stage1: the resume checkpoints were a
    `cache: false` output, missing in every temp copy), and `dvc exp show` lists its params and metrics.
    (lora.r through the queue was checked by hand, session 6: q8 ran from sft-stage1 and ended in Success.)"""
    import time

    sh(repo, "git", "checkout", "--", ".")  # the committed run (earlier tests applied experiments)
    sh(repo, "dvc", "checkout", "-f")
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "q8", "-S", "export.quantizations=[q8_0]")
    try:
        # The worker daemon inherits stdout/stderr: with them captured, waiting for EOF would wait for the worker.
        subprocess.run(["dvc", "queue", "start"], cwd=repo, env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=120)
        deadline = time.time() + 1500
        status = ""
        while time.time() < deadline:
            status = sh(repo, "dvc", "queue", "status").stdout
            row = next((line for line in status.splitlines() if " q8 " in f" {line} "), "")
            if "Success" in row or "Failed" in row:
                break
            time.sleep(5)
        logs = sh(repo, "dvc", "queue", "logs", "q8", check=False)
        assert "Success" in row, f"{status}\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}"
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill", check=False)
    ran = _ran(logs.stdout)
    assert ran == ["export"], logs.stdout[-3000:]
    shown = json.dumps(json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout))
    assert '"q8"' in shown and '"q8_0"' in shown and "q8_0.token_agreement" in shown and "stage2.mcq_acc" in shown
