"""MLflow tracking: where the local store goes; every params key reaches a run; secrets never do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kmed.config import flat, load_params, resolved_dict
from kmed.tracking import _local_uri, env_secrets, redact, workspace_root
from tests.stagekit import ROOT, write_params


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


# Canaries: credentials in the environment, and a token pasted into params.yaml that no variable holds.
ENV_CANARY = {
    "HF_TOKEN": "hf_CANARYkmedTracking0a1b2c3d4e5f6a7b8c9d",
    "AWS_SECRET_ACCESS_KEY": "CANARYkmedTrackingAws/7e6d5c4b3a2910zyxwv",
    "MLFLOW_TRACKING_PASSWORD": "canary-kmed-tracking-pw",  # no token shape: found by its variable only
    # *_KEY, *_API_KEY and *_KEY_ID names, values without a token shape: found by the variable's name only.
    "OPENAI_API_KEY": "canary-kmed-openai-api-key",
    "HF_KEY": "canary-kmed-hf-key",
    "KMED_SERVICE_KEY_ID": "canary-kmed-service-key-id",
}
PASTED = "hf_PASTEDkmedTracking9f8e7d6c5b4a3f2e1d0c"
CANARIES = (*ENV_CANARY.values(), PASTED)


def test_secrets_are_found_by_value_not_by_key_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV_CANARY.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long-enough")  # a word, not a credential
    monkeypatch.setenv("KMED_API_KEY", "short")  # too short to redact ordinary text safely
    assert set(env_secrets().values()) >= set(ENV_CANARY) and "TOKENIZERS_PARALLELISM" not in env_secrets().values()

    text, found = redact(f"a/{ENV_CANARY['HF_TOKEN']}/b {ENV_CANARY['MLFLOW_TRACKING_PASSWORD']} short")
    assert text == "a/[redacted $HF_TOKEN]/b [redacted $MLFLOW_TRACKING_PASSWORD] short"
    assert found == ["$HF_TOKEN", "$MLFLOW_TRACKING_PASSWORD"]
    for shaped in (PASTED, "AKIAABCDEFGHIJKLMNOP", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"):
        assert redact(f"x {shaped} y") == ("x [redacted token] y", ["token-shaped"])
    # What params, tags and artifacts hold besides: paths, Hub ids, hex digests, prose, keys naming tokens.
    for ordinary in ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "data/samples/aihub_koen",
                     "3f2c9a0e8b7d6c5a4f3e2d1c0b9a8f7e6d5c4b3a", "export.min_token_agreement.q4_k_m",
                     "embedded:smollm2-135m-instruct", "ThisIsAVeryLongCamelCaseIdentifierName"):
        assert redact(ordinary) == (ordinary, [])


def test_nothing_committed_looks_like_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """No false positive on what a run records: every params value of the embedded default and the recipe,
    and the committed metrics and reports (the artifacts)."""
    for k in list(env_secrets().values()):
        monkeypatch.delenv(k)
    for f in (ROOT / "params.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))):
        for key, value in flat(resolved_dict(load_params(f))).items():
            assert redact(str(value)) == (str(value), []), (f.name, key)
    for f in [*sorted((ROOT / "metrics").glob("*.*")), *sorted((ROOT / "reports").glob("*.*"))]:
        assert not redact(f.read_text(encoding="utf-8", errors="replace"))[1], f.name


def test_a_run_of_the_embedded_default_records_every_params_key_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real local MLflow store (sqlite + artifact folder): the run holds every key of the resolved params,
    "token" in a key name included; canaries in the environment, in param values, in the experiment name a
    tag carries and in an artifact reach no param, metric, tag or artifact (nor any byte of the store)."""
    from mlflow import MlflowClient

    from kmed.config import MlflowCfg
    from kmed.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    for k, v in ENV_CANARY.items():
        monkeypatch.setenv(k, v)
    store = f"sqlite:///{tmp_path / 'store/mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("KMED_MLFLOW", "1")
    monkeypatch.setenv("DVC_EXP_NAME", f"exp-{ENV_CANARY['HF_TOKEN']}")
    params = load_params(write_params(tmp_path, **{
        "export.hub_repo_adapter": f"someone/adapter-{ENV_CANARY['HF_TOKEN']}",  # an env credential in a value
        "export.hub_repo_gguf": f"someone/{PASTED}",  # a token pasted where a repo id goes
        "data.system_prompt": f"Answer. {ENV_CANARY['AWS_SECRET_ACCESS_KEY']}",
        "export.hub_repo_merged": f"{ENV_CANARY['OPENAI_API_KEY']}/{ENV_CANARY['HF_KEY']}",
        "mlflow.experiment": f"kmed-{ENV_CANARY['KMED_SERVICE_KEY_ID']}",
    }))
    resolved = resolved_dict(params)
    (tmp_path / "metrics.json").write_text('{"loss": 0.5}\n')
    (tmp_path / "card.md").write_text(f"token: {ENV_CANARY['MLFLOW_TRACKING_PASSWORD']}\n")

    with caplog.at_level(logging.WARNING, logger="kmed.tracking"):
        with Tracker(MlflowCfg(experiment="kmed-r1-test"), "export", resolved) as tr:
            tr.log_metrics({"loss": 0.5, "q8_0.token_agreement": 1.0})
            tr.log_artifact(tmp_path / "metrics.json")
            tr.log_artifact(tmp_path / "card.md")  # holds a secret: not uploaded
    assert tr.missed == [f"artifact {tmp_path / 'card.md'} (it holds a secret)"] and tr.error is None

    client = MlflowClient(store)
    run = client.get_run(tr._run.info.run_id)
    want = {k: str(v) for k, v in flat(resolved).items()}
    assert set(run.data.params) == set(want)
    for key in ("evaluate.max_new_tokens", "export.parity_tokens", "export.check_max_tokens", "data.min_cot_tokens",
                "export.min_token_agreement.q4_k_m", "data.stage2.sources"):
        assert run.data.params[key] == want[key], key  # whole, not dropped for the word "token" nor cut at 500
    assert run.data.params["export.hub_repo_adapter"] == "someone/adapter-[redacted $HF_TOKEN]"
    assert run.data.params["export.hub_repo_gguf"] == "someone/[redacted token]"
    assert run.data.params["data.system_prompt"] == "Answer. [redacted $AWS_SECRET_ACCESS_KEY]"
    assert run.data.params["export.hub_repo_merged"] == "[redacted $OPENAI_API_KEY]/[redacted $HF_KEY]"
    assert run.data.params["mlflow.experiment"] == "kmed-[redacted $KMED_SERVICE_KEY_ID]"
    assert run.data.tags["dvc_exp"] == "exp-[redacted $HF_TOKEN]" and run.data.metrics["q8_0.token_agreement"] == 1.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]

    recorded = [run.info.run_name, *run.data.params.values(), *run.data.tags.values(), *run.data.metrics,
                *(r.info.run_name for r in client.search_runs([run.info.experiment_id]))]
    got = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    recorded += [f.read_text() for f in got.rglob("*") if f.is_file()]
    for canary in CANARIES:
        assert not [r for r in recorded if canary in r], canary
    # ...nor anywhere in the store's files (database and artifact folder), by raw bytes.
    for f in (p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("params.yaml", "card.md")):
        data = f.read_bytes()
        assert not [c for c in CANARIES if c.encode() in data], f
    # The warning names the keys whose values were redacted, never a value.
    assert "export.hub_repo_gguf held a secret (token-shaped)" in caplog.text
    assert not [c for c in CANARIES if c in caplog.text]
