"""sft resumes from its newest complete checkpoint; a disk that fills up mid-save fails the stage with one
sentence and keeps what was complete before (checkpoints, the previous output)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kmed.io import StageError, atomic_dir, write_text_atomic
from tests.reliability import kit
from tests.reliability.conftest import PipelineRepo, make_sft_workdir

pytestmark = pytest.mark.reliability


def test_resume_skips_a_checkpoint_whose_trainer_state_was_deleted(sft_copy: Path) -> None:
    """(A SIGKILL mid-checkpoint leaves exactly this: the Trainer writes trainer_state.json last.)"""
    wd = sft_copy
    ck = wd / "models/checkpoints/stage1"
    (ck / "checkpoint-6/trainer_state.json").unlink()
    proc = kit.stage(wd, "stages.sft", "stage1")
    assert "skipping incomplete checkpoint models/checkpoints/stage1/checkpoint-6" in proc.stderr
    assert "resuming from models/checkpoints/stage1/checkpoint-4" in proc.stderr
    m = json.loads((wd / "metrics/sft-stage1.json").read_text())
    assert m["resumed_from_step"] == 4 and m["steps"] == 6
    assert json.loads((ck / "checkpoint-6/trainer_state.json").read_text())["global_step"] == 6  # rewritten


def _used(path: Path) -> int:
    """Bytes a folder takes on a tmpfs (whole pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_disk_full_while_saving_a_checkpoint(tmp_path: Path, tiny_model_dir: Path, sft_trained: Path) -> None:
    one = _used(sft_trained / "models/checkpoints/stage1/checkpoint-2")
    # The pre-flight check would refuse this run up front (tests/test_doctor.py); this is a disk that fills mid-run.
    wd = make_sft_workdir(tmp_path / "wd", tiny_model_dir, **{"doctor.mode": "off"})
    ckroot = wd / "models/checkpoints"
    with kit.tmpfs(ckroot, f"{(one * 3 // 2) // 1024}k"):  # room for one checkpoint, not two
        proc = kit.stage(wd, "stages.sft", "stage1", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (err,) = kit.error_lines(proc.stderr)
        assert err.startswith(
            "No space left on device while saving a checkpoint under models/checkpoints/stage1"
        )
        assert err.count(". ") == 0 and err.endswith(".")  # one sentence
        from stages.sft import checkpoint_complete

        assert checkpoint_complete(ckroot / "stage1/checkpoint-2")  # the earlier checkpoint is whole
        assert not (ckroot / "stage1/checkpoint-4/trainer_state.json").exists()
        assert not (wd / "models/stage1/adapter").exists() and not (wd / "metrics/sft-stage1.json").exists()


def test_disk_full_while_writing_preprocess_output(pipeline_repo: PipelineRepo, tmp_path: Path) -> None:
    src = pipeline_repo.path
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copy2(src / "params.yaml", wd / "params.yaml")
    shutil.copytree(src / "models/base", wd / "models/base")
    need = _used(src / "data/samples") + _used(src / "data/raw") + _used(src / "data/processed") * 3 // 2
    with kit.tmpfs(wd / "data", f"{need // 1024 + 64}k"):  # room for the inputs and one output, not two
        for d in ("samples", "raw"):
            shutil.copytree(src / "data" / d, wd / "data" / d)
        kit.stage(wd, "stages.preprocess")
        before = kit.digest(wd / "data/processed", wd / "metrics", wd / "reports")
        write_params_val = (wd / "params.yaml").read_text().replace("val_fraction: 0.1", "val_fraction: 0.2")
        (wd / "params.yaml").write_text(write_params_val)
        proc = kit.stage(wd, "stages.preprocess", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (err,) = kit.error_lines(proc.stderr)
        assert err.startswith("No space left on device while writing data/processed"), err
        assert kit.digest(wd / "data/processed", wd / "metrics", wd / "reports") == before
        assert not kit.siblings(wd / "data/processed")  # the partial copy is gone: the space is free again


def test_disk_full_in_atomic_writers_is_one_sentence_naming_the_path(tmp_path: Path) -> None:
    """The writers every stage uses, on a 128 KiB disk: text files, and torch.save's opaque error."""
    import torch

    with kit.tmpfs(tmp_path / "disk", "128k") as disk:
        write_text_atomic(disk / "metrics.json", "old\n")
        with pytest.raises(StageError, match=rf"^No space left on device while writing {disk}/metrics.json "):
            write_text_atomic(disk / "metrics.json", "x" * 400_000)
        assert (disk / "metrics.json").read_text() == "old\n" and len(list(disk.iterdir())) == 1

        with atomic_dir(disk / "model") as tmp:
            (tmp / "weights.txt").write_text("previous")
        with pytest.raises(StageError, match=rf"^No space left on device while writing {disk}/model "):
            with atomic_dir(disk / "model") as tmp:
                torch.save(
                    {"w": torch.zeros(100_000)}, tmp / "optimizer.pt"
                )  # "[enforce fail at inline_container...]"
        assert (disk / "model/weights.txt").read_text() == "previous"
        assert sorted(p.name for p in disk.iterdir()) == ["metrics.json", "model"]
