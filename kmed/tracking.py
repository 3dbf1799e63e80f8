"""MLflow mirror of each stage's params and metrics. Never the only record: metrics/ on disk is.

On by default against a local store inside the repo (`mlruns/`, git-ignored); MLFLOW_TRACKING_URI
points it elsewhere (e.g. a team `mlflow server`). Each stage is one run, nested under a parent run
per DVC experiment (name from DVC_EXP_NAME, set by `dvc exp run`). If the server is unreachable the
stage still completes and a warning says what was not logged. After the first call that cannot reach
the server the stage stops talking to it (one request timeout at most, not one per training step).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kmed.config import MlflowCfg, flat
from kmed.io import git_revision

log = logging.getLogger(__name__)

# Fail fast instead of retrying for minutes when a tracking server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

_SECRET_HINTS = ("token", "secret", "password", "aws_", "key_id", "access_key")


def _scrub(d: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential: tokens never reach the tracking store."""
    return {k: v for k, v in d.items() if not any(h in k.lower() for h in _SECRET_HINTS)}


class Tracker:
    """`with Tracker(cfg, stage, params) as tr: tr.log_metrics(...)` — every call is best effort."""

    def __init__(self, cfg: MlflowCfg, stage: str, params: dict[str, Any]) -> None:
        self.cfg, self.stage, self.params = cfg, stage, params
        self.enabled = cfg.enabled and os.environ.get("KMED_MLFLOW", "1") != "0"
        self.switched_off = not self.enabled  # off by config: nothing to warn about
        self.uri = (os.environ.get("MLFLOW_TRACKING_URI") or _local_uri(cfg.tracking_uri)) if self.enabled else ""
        self.exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
        self.missed: list[str] = []
        self.error: str | None = None  # the first failure, for the warning
        self._mlflow: Any = None
        self._run: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        try:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.cfg.experiment)
            tags = {"stage": self.stage, "dvc_exp": self.exp_name, "git_commit": git_revision()}
            if os.environ.get("DVC_EXP_BASELINE_REV"):
                tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
            try:
                tags["mlflow.parentRunId"] = self._parent_run(mlflow)
            except Exception as e:  # grouping is a convenience: log the stage run ungrouped
                self._note("parent run", e)
            self._run = mlflow.start_run(run_name=f"{self.exp_name}/{self.stage}", tags=tags, nested=False)
            self._mlflow = mlflow
            self._call("params", lambda: mlflow.log_params(_scrub({k: _short(v) for k, v in flat(self.params).items()})))
        except Exception as e:  # server down, bad URI, permissions
            self._fail("the whole run", e)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._mlflow is not None:
            self._call("run end", lambda: self._mlflow.end_run("FAILED" if exc_type else "FINISHED"))
        if self.missed:
            log.warning("MLflow at %s did not record: %s (metrics are on disk under metrics/); first error: %s",
                        self.uri, ", ".join(dict.fromkeys(self.missed)), self.error)

    def _parent_run(self, mlflow: Any) -> str:
        client = mlflow.tracking.MlflowClient()
        exp = client.get_experiment_by_name(self.cfg.experiment)
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.kmed_parent = 'true' and tags.dvc_exp = {_quote(self.exp_name)}",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(exp.experiment_id, run_name=self.exp_name,
                                tags={"kmed_parent": "true", "dvc_exp": self.exp_name})
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    # -- logging ---------------------------------------------------------------------------
    def _note(self, what: str, e: Exception) -> None:
        self.missed.append(what)
        if self.error is None:
            msg = " ".join(str(e).split())
            self.error = f"{type(e).__name__}: {msg[:300]}"
        log.debug("mlflow %s failed: %r", what, e)

    def _fail(self, what: str, e: Exception) -> None:
        # Stop talking to an unreachable server: a hung one would otherwise cost a timeout per step.
        self._note(what, e)
        self.enabled = False

    def _call(self, what: str, fn: Any) -> None:
        if not self.enabled and not (what == "run end" and self._mlflow is not None):
            if not self.switched_off:
                self.missed.append(what)
            return
        try:
            fn()
        except Exception as e:
            if _unreachable(e):
                self._fail(what, e)
            else:  # the server answered (e.g. a rejected value): keep logging the rest
                self._note(what, e)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self._call("metrics", lambda: self._mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._call(f"artifact {path}", lambda: self._mlflow.log_artifact(str(path)))


def _unreachable(e: BaseException | None) -> bool:
    """A transport failure (refused, reset, timed out) somewhere in the chain, not an answer from MLflow."""
    import requests

    for _ in range(10):
        if e is None:
            return False
        if isinstance(e, requests.exceptions.RequestException | OSError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _quote(s: str) -> str:
    """A string literal for an MLflow filter (git ref names may contain a single quote)."""
    return f'"{s}"' if "'" in s else f"'{s}'"


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."


def _local_uri(uri: str) -> str:
    """A relative local store lives in the repo root — also for `dvc exp run --temp`/`--queue`, whose
    stages run in a throwaway copy under .dvc/tmp/exps/ (a store there would vanish with the copy)."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    path = (workspace_root(Path.cwd()) / uri).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def workspace_root(cwd: Path) -> Path:
    """The user's repo for a cwd inside DVC's experiment copies (<repo>/.dvc/tmp/exps/...), else cwd."""
    parts = cwd.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd
