"""Two `dvc repro` in one workspace: the second fails fast on DVC's lock; the first finishes cleanly.
A real MLflow server SIGKILLed while the sft stage is logging to it: the stage completes, metrics on
disk, one warning; what reached the server before the kill is still there after a restart.

The server down from the start and a server that hangs are in tests/test_mlflow_server.py
(test_stage_completes_and_warns_when_the_server_is_down, test_server_hanging_mid_run_costs_one_timeout_not_one_per_step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability import kit
from tests.reliability.conftest import PipelineRepo, make_sft_workdir
from tests.stagekit import mlflow_server

pytestmark = pytest.mark.reliability


def test_second_dvc_repro_fails_fast_on_the_lock(pipeline_repo: PipelineRepo, tmp_path: Path) -> None:
    repo, p = pipeline_repo, pipeline_repo.path
    lock = (p / "dvc.lock").read_bytes()
    repo.params(**{"data.val_fraction": 0.2})
    mark, release = tmp_path / "frozen", tmp_path / "go"
    env = kit.base_env(
        **kit.fault(
            "kmed.io:write_jsonl",
            match="processed",
            action="hang",
            argv="stages.preprocess",
            mark=mark,
            release=release,
        )
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-s", "preprocess"],
        cwd=p,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        kit.wait_for(mark.exists, 120, "the first repro to be mid-write", first)
        t0 = time.monotonic()
        second = repo.repro(check=False)
        waited = time.monotonic() - t0
        assert second.returncode != 0
        # DVC 3 holds per-output read/write locks (.dvc/tmp/rwlock) while a stage runs.
        assert "is busy, it is being blocked by:" in second.stderr, second.stderr
        assert f"(PID {first.pid}): " in second.stderr and "repro -s preprocess" in second.stderr
        assert "Running stage" not in second.stdout
        assert waited < 30, waited
        assert (p / "dvc.lock").read_bytes() == lock  # nothing written by the second
    finally:
        release.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert (p / "dvc.lock").read_bytes() != lock
    assert "up to date" in repo.dvc("status", "preprocess").stdout
    assert not kit.siblings(p / "data/processed")
    assert kit.verify(p).returncode == 0


def test_mlflow_server_killed_mid_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    wd = make_sft_workdir(tmp_path / "wd", tiny_model_dir,
                          **{"mlflow.enabled": True, "mlflow.experiment": "kmed-kill"})
    mark, release, store = tmp_path / "frozen", tmp_path / "go", tmp_path / "mlflow"
    with mlflow_server(store) as (url, server):
        # Freeze the stage just before its 3rd per-step log (steps 1 and 2 are on the server), kill the
        # server with its workers, let the stage go on.
        env = kit.base_env(
            KMED_MLFLOW="1", MLFLOW_TRACKING_URI=url, DVC_EXP_NAME="exp-kill",
            **kit.fault("kmed.tracking:Tracker.log_metrics", nth=3, action="hang", argv="stages.sft",
                        mark=mark, release=release),
        )
        stage = subprocess.Popen([kit.PY, "-m", "stages.sft", "stage1"], cwd=wd, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            kit.wait_for(mark.exists, 300, "the stage to log its 3rd step", stage)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        finally:
            release.touch()
            t0 = time.monotonic()
            out, err = stage.communicate(timeout=600)
        rest = time.monotonic() - t0
    assert stage.returncode == 0, err[-3000:]
    metrics = json.loads((wd / "metrics/sft-stage1.json").read_text())
    assert metrics["steps"] == 6 and (wd / "models/stage1/adapter/adapter_model.safetensors").is_file()
    (warning,) = [ln for ln in err.splitlines() if "did not record" in ln]
    assert f"MLflow at {url} did not record: metrics" in warning and "run end" in warning
    assert "metrics are on disk under metrics/" in warning
    assert rest < 120, rest  # the tracker switched itself off: no timeout paid per remaining step

    # Restarted on the same store: the run and its first two loss points survived the kill.
    with mlflow_server(store) as (url2, _):
        client = MlflowClient(url2)
        exp = client.get_experiment_by_name("kmed-kill")
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'sft-stage1'")
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    curve = [ln.split("\t") for ln in (wd / "metrics/sft-stage1-curve.tsv").read_text().splitlines()[1:]]
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([float(r[1]) for r in curve[:2]], abs=1e-5)
    assert run.info.status == "RUNNING"  # the server was gone when the stage ended
