"""Two `dvc repro` in one workspace: the second fails fast on DVC's lock; the first finishes cleanly.

The MLflow server going away is covered by tests/test_mlflow_server.py
(test_stage_completes_and_warns_when_the_server_is_down, test_server_hanging_mid_run_costs_one_timeout_not_one_per_step).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability import kit
from tests.reliability.conftest import PipelineRepo

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
