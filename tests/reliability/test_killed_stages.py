"""Killed stages: SIGKILL in the middle of writing an output never leaves a half-written output under
the real name (it is the previous complete one, or absent), dvc.lock is untouched, and a rerun completes.

The kill is injected at a known point inside the write (tests/reliability/inject/sitecustomize.py):
after the n-th file of the output's temporary sibling is written, or between the two renames that swap
it in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.reliability import kit
from tests.reliability.conftest import PipelineRepo, make_sft_workdir

pytestmark = pytest.mark.reliability

WRITER = textwrap.dedent("""
    import sys
    from kmed.io import atomic_dir, write_text_atomic
    version = sys.argv[1]
    with atomic_dir("out") as tmp:
        for i in range(3):
            write_text_atomic(tmp / f"part-{i}.txt", f"{version} {i}\\n")
        if version == "boom":
            raise RuntimeError("the stage failed")
""")


def _write(wd: Path, version: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    return kit.run([sys.executable, "-c", WRITER, version], wd, check=check, env=kit.base_env(**env))


def test_atomic_dir_killed_mid_write_or_between_renames(tmp_path: Path) -> None:
    """kmed.io.atomic_dir on its own: the promise every stage output relies on."""
    out = tmp_path / "out"
    _write(tmp_path, "v1")
    v1 = kit.digest(out)

    # Killed after 2 of 3 files: `out` is still v1; the partial copy is only in the temp sibling.
    proc = _write(tmp_path, "v2", check=False, **kit.fault("kmed.io:write_text_atomic", nth=2))
    assert proc.returncode == -signal.SIGKILL
    assert kit.digest(out) == v1
    (tmp,) = kit.siblings(out)
    assert sorted(p.name for p in tmp.iterdir()) == ["part-0.txt", "part-1.txt"]

    # Killed between `out -> .out.old-PID` and `.out.tmp-PID -> out`: no `out` at all (never a partial one).
    proc = _write(
        tmp_path,
        "v2",
        check=False,
        **kit.fault("pathlib:Path.rename", match=".out.tmp-", action="kill-before"),
    )
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and len(kit.siblings(out, "old")) == 1

    # The next run puts the previous complete output back even though it fails itself...
    assert _write(tmp_path, "boom", check=False).returncode != 0
    assert kit.digest(out) == v1
    assert not kit.siblings(out) and not kit.siblings(out, "old")
    # ...and a good run replaces it and leaves no temp or old sibling behind.
    _write(tmp_path, "v3")
    assert (out / "part-2.txt").read_text() == "v3 2\n"
    assert not kit.siblings(out) and not kit.siblings(out, "old")


def test_preprocess_killed_mid_write_under_dvc(pipeline_repo: PipelineRepo) -> None:
    repo, p = pipeline_repo, pipeline_repo.path
    before = repo.outputs()
    lock = (p / "dvc.lock").read_bytes()
    repo.params(**{"data.val_fraction": 0.2})
    # The stage SIGKILLs itself after writing 3 of the 6 files of data/processed.
    proc = repo.repro(
        check=False, **kit.fault("kmed.io:write_jsonl", match="processed", nth=3, argv="stages.preprocess")
    )
    assert proc.returncode != 0
    assert "failed to reproduce 'preprocess'" in proc.stderr, proc.stderr[-2000:]
    assert (p / "dvc.lock").read_bytes() == lock
    assert repo.outputs() == before  # data/processed, reports, metrics: the previous run's, byte for byte
    (tmp,) = kit.siblings(p / "data/processed")
    assert len([f for f in tmp.rglob("*.jsonl")]) == 3  # it really was killed mid-write

    repo.repro()
    assert not kit.siblings(p / "data/processed")
    assert (p / "dvc.lock").read_bytes() != lock
    assert "up to date" in repo.dvc("status", "preprocess").stdout
    assert json.loads((p / "metrics/data.json").read_text())["stage1.val_rows"] > 0
    assert kit.verify(p).returncode == 0


def test_dvc_repro_killed_keeps_lock_and_reruns(pipeline_repo: PipelineRepo, tmp_path: Path) -> None:
    """SIGKILL to `dvc repro` and its stage together (a killed CI job, an OOM-killed session)."""
    repo, p = pipeline_repo, pipeline_repo.path
    before = repo.outputs()
    lock = (p / "dvc.lock").read_bytes()
    repo.params(**{"data.val_fraction": 0.2})
    mark = tmp_path / "frozen"
    env = kit.base_env(
        **kit.fault(
            "kmed.io:write_jsonl",
            match="processed",
            nth=4,
            action="hang",
            argv="stages.preprocess",
            mark=mark,
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-s", "preprocess"],
        cwd=p,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        kit.wait_for(mark.exists, 120, "the stage to reach its 4th file", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert (p / "dvc.lock").read_bytes() == lock
    assert repo.outputs() == before
    assert kit.siblings(p / "data/processed")

    rerun = repo.repro()  # no stale lock from the dead dvc process stops it
    assert "Running stage 'preprocess'" in rerun.stdout
    assert (p / "dvc.lock").read_bytes() != lock
    assert "up to date" in repo.dvc("status", "preprocess").stdout
    assert not kit.siblings(p / "data/processed")
    assert kit.verify(p).returncode == 0


def test_sft_killed_mid_adapter_write_keeps_previous_adapter(sft_copy: Path) -> None:
    """Killed after training, while promoting the adapter: the previous adapter stays, and the rerun
    (which resumes from the final checkpoint) promotes exactly what the uninterrupted run did."""
    from safetensors.torch import load_file

    wd = sft_copy
    adapter = wd / "models/stage1/adapter"
    before = kit.digest(adapter, wd / "metrics")
    uninterrupted = load_file(adapter / "adapter_model.safetensors")
    # Same config, so the run resumes from checkpoint-6 (= max_steps) and goes straight to promotion.
    # Killed right after the adapter weights land in the temp sibling (before tokenizer and lineage).
    proc = kit.stage(
        wd,
        "stages.sft",
        "stage1",
        check=False,
        **kit.fault("safetensors.torch:save_file", match="models/stage1/"),
    )
    assert proc.returncode == -signal.SIGKILL
    assert kit.digest(adapter, wd / "metrics") == before
    (tmp,) = kit.siblings(adapter)
    assert (tmp / "adapter_model.safetensors").exists() and not (tmp / "lineage.json").exists()

    kit.stage(wd, "stages.sft", "stage1")
    assert not kit.siblings(adapter)
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["resumed_from"] == "models/checkpoints/stage1/checkpoint-6"
    m = json.loads((wd / "metrics/sft-stage1.json").read_text())
    assert m["resumed_from_step"] == 6 and m["steps"] == 6  # not one step past max_steps
    assert not (wd / "models/checkpoints/stage1/checkpoint-7").exists()
    rerun = load_file(adapter / "adapter_model.safetensors")
    assert rerun.keys() == uninterrupted.keys()
    assert all((rerun[k] == uninterrupted[k]).all() for k in rerun)


def test_merge_killed_mid_write_leaves_no_merged_model(sft_copy: Path) -> None:
    wd = sft_copy
    merged = wd / "models/stage1/merged"
    proc = kit.stage(
        wd, "stages.merge", "stage1", check=False, **kit.fault("safetensors.torch:save_file", match="merged")
    )
    assert proc.returncode == -signal.SIGKILL
    assert not merged.exists()
    (tmp,) = kit.siblings(merged)
    assert (tmp / "model.safetensors").exists() and not (tmp / "lineage.json").exists()
    assert not (wd / "metrics/merge-stage1.json").exists()

    kit.stage(wd, "stages.merge", "stage1")
    assert {"model.safetensors", "config.json", "tokenizer.json", "lineage.json"} <= {
        f.name for f in merged.iterdir()
    }
    assert not kit.siblings(merged)


EXPORT_PARAMS = {
    "export.quantizations": ["q8_0"],
    "export.min_token_agreement": {"f16": 0.9, "q8_0": 0.8},
    "export.max_ppl_delta": {"q8_0": 0.05},
    # The tiny Llama's logits are all 0: greedy picks token 0 (an end of generation for llama.cpp), sampling
    # would pick at random; and it writes no R1 answer.
    "generate.do_sample": False,
    "export.min_chat_format_ok": 0.0,
    "mlflow.enabled": False,
}


def export_workdir(wd: Path, tiny_llama_dir: Path) -> Path:
    """models/stage2/merged = the tiny Llama with the chat template merge writes; held-out text from tiny splits."""
    from kmed.config import load_params
    from kmed.modeling import load_tokenizer
    from kmed.prompt import chat_template

    make_sft_workdir(wd, tiny_llama_dir, **EXPORT_PARAMS)
    (wd / "models/stage2").mkdir(parents=True)
    merged = wd / "models/stage2/merged"
    (wd / "models/base").rename(merged)
    tok = load_tokenizer(merged)
    tok.chat_template = chat_template("seed", load_params(wd / "params.yaml").data.system_prompt, tok)
    tok.save_pretrained(merged)
    return wd


def test_export_killed_mid_write_leaves_no_export(tmp_path: Path, tiny_llama_dir: Path) -> None:
    wd = export_workdir(tmp_path / "wd", tiny_llama_dir)
    out = wd / "models/export"
    # Killed right after llama.cpp wrote the q8_0 GGUF (f16 is there too; no model card yet). Quantizing
    # runs in a worker process (kmed.ggufio.isolated), so the stage itself is killed when the worker's
    # result comes back; the ARGV filter keeps the fault out of the spawned worker.
    fault = kit.fault("kmed.ggufio:isolated", match="function quantize", argv="stages.export")
    proc = kit.stage(wd, "stages.export", check=False, **fault)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    (tmp,) = kit.siblings(out)
    assert {p.name for p in tmp.iterdir()} == {"model-f16.gguf", "model-q8_0.gguf"}

    kit.stage(wd, "stages.export")
    assert {p.name for p in out.iterdir()} == {"model-q8_0.gguf", "README.md", "Modelfile", "files.json", "decoding.json"}
    assert not kit.siblings(out)
    m = json.loads((wd / "metrics/export.json").read_text())
    assert m["q8_0.chat_stopped"] == 1 and m["q8_0.token_agreement"] == 1.0
    assert yaml.safe_load((wd / "params.yaml").read_text())["export"]["quantizations"] == ["q8_0"]


def test_export_under_its_token_agreement_threshold_fails_and_keeps_the_previous_export(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A GGUF whose greedy token agreement with the merged model is under `export.min_token_agreement`
    fails the stage with one sentence (exit 2); the previous export and its metrics stay byte-identical.
    The tiny Llama agrees 1.000, so a threshold of 1.01 puts q8_0 under it."""
    wd = export_workdir(tmp_path / "wd", tiny_llama_dir)
    kit.stage(wd, "stages.export")
    out, metrics = wd / "models/export", wd / "metrics/export.json"
    assert json.loads(metrics.read_text())["q8_0.token_agreement"] == 1.0
    before = kit.digest(out, metrics)

    raw = yaml.safe_load((wd / "params.yaml").read_text())
    raw["export"]["min_token_agreement"]["q8_0"] = 1.01
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    proc = kit.stage(wd, "stages.export", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert kit.error_lines(proc.stderr) == [
        "model-q8_0.gguf: greedy token agreement 1.000 is below export.min_token_agreement.q8_0=1.01."
    ]
    assert "Traceback" not in proc.stderr
    assert kit.digest(out, metrics) == before
    assert not kit.siblings(out) and not kit.siblings(out, "old")


def test_llama_cpp_never_runs_in_the_export_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """On the H200, llama.cpp's CUDA backend died with SIGSEGV when it opened a GGUF in a process where torch
    had used CUDA. Here importing llama.cpp in export's own process crashes it the same way (SIGSEGV): the
    stage still completes, because every llama.cpp call (the backend probe, quantize, each GGUF's checks) runs
    in a spawned worker (`kmed.ggufio.isolated`), whose command line is not the stage's."""
    crash = kit.fault("llama_cpp", action="segv", argv="stages.export")
    control = kit.run([kit.PY, "-c", "import llama_cpp", "stages.export"], tmp_path, check=False,
                      env=kit.base_env(**crash))
    assert control.returncode == -signal.SIGSEGV  # the fault is live in a process that looks like the stage

    wd = export_workdir(tmp_path / "wd", tiny_llama_dir)
    proc = kit.stage(wd, "stages.export", check=False, **crash)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((wd / "metrics/export.json").read_text())
    # llama.cpp did the work (only it computes these), in the workers.
    assert m["f16.token_agreement"] == m["q8_0.token_agreement"] == 1.0 and m["q8_0.chat_stopped"] == 1
    assert {p.name for p in (wd / "models/export").iterdir()} >= {"model-q8_0.gguf", "README.md"}
