"""prepare-base through its real entry: a rebuild of the same base is byte-identical.

Every clone rebuilds models/base (`push: false`), so DVC must see the same hash for the same base: no
wall-clock field may reach the folder (the stage's time goes to metrics/prepare-base.json).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.stagekit import run_stage, write_params

pytestmark = pytest.mark.integration


def _files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_rebuilt_base_is_byte_identical(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    write_params(wd, **{"mlflow.enabled": False})
    run_stage(wd, "stages.prepare_base")
    once = _files(wd / "models/base")
    lineage = json.loads((wd / "models/base/lineage.json").read_text())
    assert lineage["base_model"] == "embedded:smollm2-135m-instruct" and "created_unix" not in lineage
    shutil.rmtree(wd / "models/base")
    run_stage(wd, "stages.prepare_base")
    assert _files(wd / "models/base") == once
    assert "base.seconds" in json.loads((wd / "metrics/prepare-base.json").read_text())
