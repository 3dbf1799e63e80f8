"""MLflow in server mode: a real `mlflow server` (sqlite backend, served artifacts) on loopback, the real
sft and merge stages on the tiny Qwen2, checked through the MLflow client; then the same stage with
the server gone (completes, metrics on disk, a warning) and a server that hangs mid-run (one timeout,
not one per step).

The export stage logs its model card the same way (`tr.log_artifact(OUT / "README.md")` in
stages/export.py); it is not run here: GGUF conversion + llama.cpp verification is the slowest stage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stagekit import free_port, read_json, run_stage
from tests.stagekit import mlflow_server as kit_mlflow_server
from tests.test_sft import _workdir

EXP = "exp-test"
STEPS = 6
FAST = {"mlflow.enabled": True, "train.max_steps": STEPS, "train.save_steps": 3, "lora.r": 8,
        "mlflow.experiment": "kmed-r1-test"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with kit_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (url, _):
        yield url


def _git_repo(wd: Path) -> str:
    """Make the workdir a git repo so the stage has a real commit to tag."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    for cmd in (["init", "-q"], ["add", "params.yaml", "data"], ["commit", "-qm", "inputs"]):
        subprocess.run(["git", *cmd], cwd=wd, env=env, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=wd, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.integration
def test_stage_runs_are_grouped_under_the_dvc_experiment(tmp_path: Path, tiny_model_dir: Path,
                                                         mlflow_server: str) -> None:
    from mlflow import MlflowClient

    wd = _workdir(tmp_path, tiny_model_dir, **FAST)
    commit = _git_repo(wd)
    env = {"KMED_MLFLOW": "1", "MLFLOW_TRACKING_URI": mlflow_server, "DVC_EXP_NAME": EXP}
    for stage in (("stages.sft", "stage1"), ("stages.merge", "stage1")):
        proc = run_stage(wd, *stage, **env)
        assert "did not record" not in proc.stderr, proc.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("kmed-r1-test")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.dvc_exp = '{EXP}'")
    parents = [r for r in runs if r.data.tags.get("kmed_parent") == "true"]
    assert len(parents) == 1 and parents[0].info.run_name == EXP  # one parent, reused by the 2nd stage
    parent = parents[0].info.run_id
    children = {r.data.tags["stage"]: r for r in runs if r.info.run_id != parent}
    assert len(runs) == 3 and set(children) == {"sft-stage1", "merge-stage1"}
    for stage, run in children.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent and tags["dvc_exp"] == EXP
        assert tags["git_commit"] == commit and run.info.run_name == f"{EXP}/{stage}"
        assert run.info.status == "FINISHED"

    # sft: params, one loss point per optimizer step (equal to the TSV curve), final metrics.
    sft = children["sft-stage1"]
    assert sft.data.params["lora.r"] == "8" and sft.data.params["train.max_steps"] == str(STEPS)
    assert sft.data.params["lora.target_modules"].startswith("[")
    history = sorted(client.get_metric_history(sft.info.run_id, "loss"), key=lambda m: m.step)
    curve = (wd / "metrics/sft-stage1-curve.tsv").read_text().splitlines()[1:]
    assert [m.step for m in history] == list(range(1, STEPS + 1)) == [int(r.split("\t")[0]) for r in curve]
    assert [m.value for m in history] == pytest.approx([float(r.split("\t")[1]) for r in curve], abs=1e-5)
    assert len(client.get_metric_history(sft.info.run_id, "learning_rate")) == STEPS
    on_disk = read_json(wd / "metrics/sft-stage1.json")
    assert sft.data.metrics["final.steps"] == STEPS
    assert sft.data.metrics["final.train_loss_final"] == pytest.approx(on_disk["train_loss_final"])

    # Artifacts: the stage's metrics JSON, byte-identical to the one on disk (served by the server).
    for stage, name in (("sft-stage1", "sft-stage1.json"), ("merge-stage1", "merge-stage1.json")):
        run = children[stage]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [name]
        local = client.download_artifacts(run.info.run_id, name, str(tmp_path / stage))
        assert json.loads(Path(local).read_text()) == read_json(wd / "metrics" / name)
    merge = children["merge-stage1"]
    assert merge.data.metrics["parity_max_abs"] == pytest.approx(read_json(wd / "metrics/merge-stage1.json")
                                                                 ["parity_max_abs"])


@pytest.mark.integration
def test_stage_completes_and_warns_when_the_server_is_down(tmp_path: Path, tiny_model_dir: Path) -> None:
    wd = _workdir(tmp_path, tiny_model_dir, **FAST)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = run_stage(wd, "stages.sft", "stage1", KMED_MLFLOW="1", MLFLOW_TRACKING_URI=down, DVC_EXP_NAME=EXP)
    elapsed = time.monotonic() - t0
    assert read_json(wd / "metrics/sft-stage1.json")["steps"] == STEPS
    assert (wd / "models/stage1/adapter/adapter_model.safetensors").exists()
    warning = next(line for line in proc.stderr.splitlines() if "did not record" in line)
    assert f"MLflow at {down} did not record: the whole run, metrics" in warning
    assert "artifact metrics/sft-stage1.json" in warning and "metrics are on disk" in warning
    assert "first error: MlflowException" in warning
    assert elapsed < 180, elapsed  # no retry storm (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 set by kmed.tracking)


@pytest.mark.integration
def test_server_hanging_mid_run_costs_one_timeout_not_one_per_step(
        mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run starts on the live server, then every request hangs (a socket that never answers):
    the tracker gives up after the first timeout instead of paying it for each of 100 steps."""
    import mlflow

    from kmed.config import MlflowCfg
    from kmed.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # read at request time
    monkeypatch.setenv("DVC_EXP_NAME", "exp-hang")
    monkeypatch.delenv("KMED_MLFLOW", raising=False)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(128)  # the kernel completes the handshake; nobody ever answers
        t0 = time.monotonic()
        with Tracker(MlflowCfg(experiment="kmed-r1-test"), "sft-stage1", {"lora": {"r": 8}}) as tr:
            assert tr._run is not None  # started on the live server
            mlflow.set_tracking_uri(f"http://127.0.0.1:{hung.getsockname()[1]}")
            for step in range(1, 101):
                tr.log_metrics({"loss": 1.0 / step}, step=step)
        elapsed = time.monotonic() - t0
    mlflow.set_tracking_uri(mlflow_server)
    assert elapsed < 20, elapsed  # ~2 timeouts (first metric + run end), not 100
    assert tr.missed.count("metrics") == 100 and "run end" in tr.missed
    assert "did not record: metrics, run end" in caplog.text and "first error:" in caplog.text


@pytest.mark.integration
def test_a_rejected_value_does_not_stop_the_rest_of_the_run(
        mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only an unreachable server switches the tracker off; an answered error loses just that call."""
    from mlflow import MlflowClient

    from kmed.config import MlflowCfg
    from kmed.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-reject")
    monkeypatch.delenv("KMED_MLFLOW", raising=False)
    with Tracker(MlflowCfg(experiment="kmed-r1-test"), "merge-stage1", {"merge": {"save_dtype": "bf16"}}) as tr:
        tr.log_metrics({"bad!name": 1.0}, step=1)  # refused by MLflow's name validation
        tr.log_metrics({"loss": 0.5}, step=1)
    assert tr.missed == ["metrics"] and tr.enabled
    assert [m.value for m in MlflowClient(mlflow_server).get_metric_history(tr._run.info.run_id, "loss")] == [0.5]
