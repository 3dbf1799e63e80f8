"""Where the local MLflow store goes: the repo root, also from DVC's experiment copies."""

from __future__ import annotations

from pathlib import Path

from kmed.tracking import _local_uri, workspace_root


def test_workspace_root_maps_dvc_experiment_copies_to_the_repo(tmp_path: Path) -> None:
    exp = tmp_path / "repo/.dvc/tmp/exps/standalone/tmpab12cd"
    exp.mkdir(parents=True)
    assert workspace_root(exp) == (tmp_path / "repo").resolve()
    assert workspace_root(tmp_path / "repo") == tmp_path / "repo"


def test_local_store_of_a_queued_experiment_is_the_repos(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    exp = tmp_path / "repo/.dvc/tmp/exps/run/abc123"
    exp.mkdir(parents=True)
    monkeypatch.chdir(exp)
    uri = _local_uri("mlruns")
    assert uri == f"sqlite:///{(tmp_path / 'repo/mlruns/mlflow.db').resolve()}"
    assert (tmp_path / "repo/mlruns").is_dir() and not (exp / "mlruns").exists()
    assert _local_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
