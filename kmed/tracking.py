"""MLflow mirror of each stage's params and metrics. Never the only record: metrics/ on disk is.

On by default against a local store inside the repo (`mlruns/`, git-ignored); MLFLOW_TRACKING_URI
points it elsewhere (e.g. a team `mlflow server`). Each stage is one run, nested under a parent run
per DVC experiment (name from DVC_EXP_NAME, set by `dvc exp run`). If the server is unreachable the
stage still completes and a warning says what was not logged. After the first call that cannot reach
the server the stage stops talking to it (one request timeout at most, not one per training step).

Every run records every key of the resolved params (dotted, as `flat` writes them), so runs compare on
any setting in the MLflow UI. Secrets are kept out by their values, never by key names (a name-based
filter dropped `evaluate.max_new_tokens` and every other key containing "token"): the value of each
environment variable whose name says credential (HF_TOKEN, AWS_SECRET_ACCESS_KEY, *_PASSWORD, ...) and
any token-shaped string are redacted from param and tag values, and an artifact holding one is not
uploaded.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from kmed.config import MlflowCfg, flat
from kmed.io import git_revision

log = logging.getLogger(__name__)

# Fail fast instead of retrying for minutes when a tracking server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

# Environment variables whose values are credentials: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, AWS_SESSION_TOKEN,
# AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD, GITHUB_TOKEN, OPENAI_API_KEY, ...
# (TOKEN as a word: TOKENIZERS_PARALLELISM is not one.)
_SECRET_ENV_NAME = re.compile(r"(?:^|_)TOKEN(?:_|$)|(?:^|_)SECRET|PASSWORD|PASSWD|PASSPHRASE|(?:^|_)KEY(?:_ID)?$",
                              re.IGNORECASE)
# Shorter values (a flag, a region) would redact ordinary text; no real credential is that short.
_MIN_SECRET_LEN = 8
# Token shapes, also when no environment variable holds them (pasted into params.yaml, a run name...).
_TOKEN_SHAPES = re.compile(
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{40,}"  # GitHub
    r"|sk-[A-Za-z0-9_-]{32,}"  # OpenAI-style API keys
)
# Anything else base64-ish, 32+ characters, mixing upper case, lower case and digits (an AWS secret key,
# a random API key); `_`, `-` and `.` end a run, so paths, Hub ids and git/sha256 hex digests stay.
_BASE64ISH = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{32,}={0,2}(?![A-Za-z0-9+/=])")


def env_secrets() -> dict[str, str]:
    """{value: variable name} of the environment's credentials, read now (a test or a shell may set them late)."""
    return {v.strip(): k for k, v in os.environ.items()
            if _SECRET_ENV_NAME.search(k) and len(v.strip()) >= _MIN_SECRET_LEN}


def _high_entropy(s: str) -> bool:
    if not (re.search(r"[A-Z]", s) and re.search(r"[a-z]", s) and re.search(r"\d", s)):
        return False
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) >= 3.5  # random base64 of 32: ~4.5


def redact(text: str, secrets: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """`text` with every credential replaced by `[redacted ...]`, and what was found (variable names or
    "token-shaped" — never the values). `secrets`: env_secrets(), passed in when redacting many values."""
    found: list[str] = []
    # Longest first: one credential may contain another.
    for value, name in sorted((env_secrets() if secrets is None else secrets).items(), key=lambda kv: -len(kv[0])):
        if value in text:
            text = text.replace(value, f"[redacted ${name}]")
            found.append(f"${name}")

    def shape(m: re.Match[str]) -> str:
        found.append("token-shaped")
        return "[redacted token]"

    text = _TOKEN_SHAPES.sub(shape, text)
    text = _BASE64ISH.sub(lambda m: shape(m) if _high_entropy(m.group(0)) else m.group(0), text)
    return text, found


def _scrub(d: dict[str, str]) -> dict[str, str]:
    """The same keys with every secret redacted from the values (a redacted key is named in the log, its
    value never)."""
    secrets = env_secrets()
    out: dict[str, str] = {}
    for k, v in d.items():
        out[k], found = redact(v, secrets)
        if found:
            log.warning("MLflow: the value of %s held a secret (%s); it is recorded redacted",
                        k, ", ".join(dict.fromkeys(found)))
    return out


def _holds_secret(path: Path) -> bool:
    """Whether a file to upload holds a credential (artifacts are metrics, reports and the model card)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return False
    return bool(redact(text)[1])


class Tracker:
    """`with Tracker(cfg, stage, resolved_dict(params)) as tr: tr.log_metrics(...)` — every call is best
    effort. `params`: the whole resolved params, whichever part the stage reads."""

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
            tags = _scrub(tags)
            run_name = _scrub({"run name": f"{self.exp_name}/{self.stage}"})["run name"]
            self._run = mlflow.start_run(run_name=run_name, tags=tags, nested=False)
            self._mlflow = mlflow
            # Redacted before shortening, so a secret cut at the length limit cannot leave its first half.
            params = {k: _short(v) for k, v in _scrub({k: str(v) for k, v in flat(self.params).items()}).items()}
            self._call("params", lambda: mlflow.log_params(params))
        except Exception as e:  # server down, bad URI, permissions
            self._fail("the whole run", e)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._mlflow is not None:
            self._call("run end", lambda: self._mlflow.end_run("FAILED" if exc_type else "FINISHED"))
        if self.missed:
            log.warning("MLflow at %s did not record: %s (metrics are on disk under metrics/); first error: %s",
                        _no_userinfo(self.uri), ", ".join(dict.fromkeys(self.missed)), self.error)

    def _parent_run(self, mlflow: Any) -> str:
        client = mlflow.tracking.MlflowClient()
        exp = client.get_experiment_by_name(self.cfg.experiment)
        name = _scrub({"parent run name": self.exp_name})["parent run name"]
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.kmed_parent = 'true' and tags.dvc_exp = {_quote(name)}",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(exp.experiment_id, run_name=name, tags={"kmed_parent": "true", "dvc_exp": name})
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    # -- logging ---------------------------------------------------------------------------
    def _note(self, what: str, e: Exception) -> None:
        self.missed.append(what)
        if self.error is None:
            msg = redact(" ".join(str(e).split()))[0]  # an error may quote a URI or header with a credential
            self.error = f"{type(e).__name__}: {msg[:300]}"
        log.debug("mlflow %s failed: %s", what, redact(repr(e))[0])

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
        if not Path(path).exists():
            return
        if self.enabled and _holds_secret(Path(path)):
            self.missed.append(f"artifact {path} (it holds a secret)")
            return
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


_MAX_PARAM = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def _short(v: Any) -> str:
    """A param value within MLflow's limit (data.stage2.sources of the embedded default is ~600 characters)."""
    s = str(v)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def _no_userinfo(uri: str) -> str:
    """A tracking URI for the log, without a `user:password@` part."""
    return re.sub(r"//[^/@\s]*@", "//***@", uri)


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
