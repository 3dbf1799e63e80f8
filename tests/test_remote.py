"""The team remote against a real S3 API (moto's standalone server on loopback): push → wipe → pull is
byte-exact, `push: false` outputs never leave the machine, a SIGKILLed push resumes, and a corrupted
remote object is refused on pull (the committed `verify = true`).

The temp repos mirror the real storage policy (models/base cached but `push: false`; the sft resume
checkpoints are no DVC output at all: plain git-ignored files of one machine) and take the `team` remote from the repo's own `.dvc/config`, pointed at
the test bucket with `dvc remote modify --local`, exactly as docs/sharing.md tells a user to.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.stagekit import moto_s3_server

ROOT = Path(__file__).resolve().parents[1]
PUSHED = ("data/processed", "models/stage1/adapter")  # what the temp pipeline pushes
NOT_PUSHED = ("models/base", "models/checkpoints/stage1")

MAKE_PY = '''"""Deterministic stand-in for the pipeline: python make.py base|train N_FILES"""
import random
import sys
from pathlib import Path

what, n = sys.argv[1], int(sys.argv[2])
r = random.Random(what)
def w(p, size):
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(r.randbytes(size))
if what == "base":
    w("models/base/model.safetensors", 200_000)
    w("models/base/tokenizer.json", 5_000)
else:
    for i in range(n):
        w(f"data/processed/stage1/part-{i:04d}.bin", 16_384)
    w("models/stage1/adapter/adapter_model.safetensors", 300_000)
    w("models/checkpoints/stage1/checkpoint-4/optimizer.pt", 50_000)
'''

DVC_YAML = """stages:
  prepare-base:
    cmd: python make.py base 0
    deps: [make.py]
    outs:
      - models/base:
          persist: true
          push: false
  train:
    cmd: python make.py train {n}
    deps: [make.py, models/base]
    outs:
      - data/processed:
          persist: true
      - models/stage1/adapter:
          persist: true
"""


# ---------------------------------------------------------------------------------------------
# Fixtures: the S3 server and a throwaway git+dvc repo
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port; always stopped."""
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


def _aws_env() -> dict[str, str]:
    """Dummy credentials from the environment, as a user would pass real ones (never in .dvc/config)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def _s3(endpoint: str):  # noqa: ANN202
    import boto3

    env = _aws_env()
    return boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


class Repo:
    """A temp git+dvc repo whose `team` remote is a fresh bucket on the moto server."""

    def __init__(self, path: Path, endpoint: str, n_files: int) -> None:
        self.path, self.endpoint = path, endpoint
        self.bucket = f"kmed-test-{uuid.uuid4().hex[:12]}"
        self.s3 = _s3(endpoint)
        self.s3.create_bucket(Bucket=self.bucket)
        home = path.parent / f"{path.name}-home"
        home.mkdir()
        for f in ("aws_config", "aws_credentials"):  # keep the user's ~/.aws out of it
            (home / f).write_text("")
        self.env = {**os.environ, **_aws_env(), "AWS_CONFIG_FILE": str(home / "aws_config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws_credentials"), "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "g"),
                    "DVC_SYSTEM_CONFIG_DIR": str(home / "s"), "DVC_SITE_CACHE_DIR": str(home / "site"),
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
        path.mkdir()
        self.git("init", "-q")
        self.dvc("init", "-q")
        # The team remote exactly as committed, then the per-user overrides in config.local.
        (path / ".dvc/config").write_text((ROOT / ".dvc/config").read_text())
        self.dvc("remote", "modify", "--local", "team", "url", f"s3://{self.bucket}/cache")
        self.dvc("remote", "modify", "--local", "team", "endpointurl", endpoint)
        (path / "make.py").write_text(MAKE_PY)
        (path / "dvc.yaml").write_text(DVC_YAML.format(n=n_files))
        self.dvc("repro", "-q")
        self.git("add", "-A")
        self.git("commit", "-qm", "results")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(cmd), cwd=self.path, env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("git", *args)

    # -- what is where -------------------------------------------------------------------------
    def files(self, *roots: str) -> dict[str, bytes]:
        return {str(p.relative_to(self.path)): p.read_bytes()
                for r in roots for p in sorted((self.path / r).rglob("*")) if p.is_file()}

    def out_hash(self, out: str) -> str:
        lock = yaml.safe_load((self.path / "dvc.lock").read_text())
        return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)

    def objects_of(self, out: str) -> set[str]:
        """Cache object ids (`ab/cdef….dir`, `ab/cdef…`) of a directory output: its .dir and its files."""
        import json

        d = self.out_hash(out)
        entries = json.loads((self.path / ".dvc/cache/files/md5" / d[:2] / d[2:]).read_text())
        return {f"{d[:2]}/{d[2:]}"} | {f"{e['md5'][:2]}/{e['md5'][2:]}" for e in entries}

    def cache_objects(self) -> set[str]:
        root = self.path / ".dvc/cache/files/md5"
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    def remote_objects(self) -> dict[str, str]:
        """{object id: S3 key} under the remote's cache prefix."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="cache/files/md5/")
        return {o["Key"].removeprefix("cache/files/md5/"): o["Key"] for pg in pages for o in pg.get("Contents", [])}

    def assert_remote_objects_whole(self) -> None:
        """Content-addressed: every object's bytes hash to its own name (no partial uploads)."""
        for oid, key in self.remote_objects().items():
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            assert hashlib.md5(body).hexdigest() == oid.replace("/", "").removesuffix(".dir"), key

    def wipe(self) -> None:
        """Delete the local cache and every workspace output (as on a fresh machine)."""
        import shutil

        for p in (".dvc/cache", "data/processed", "models"):
            shutil.rmtree(self.path / p, ignore_errors=True)

    def pull(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Targets = the stages whose outputs are pushed (docs/sharing.md: not `--allow-missing`).
        return self.dvc("pull", "train", check=check)


@pytest.fixture
def repo_factory(tmp_path: Path, s3_endpoint: str):  # noqa: ANN201
    return lambda n_files=24: Repo(tmp_path / f"r{uuid.uuid4().hex[:6]}", s3_endpoint, n_files)


# ---------------------------------------------------------------------------------------------
# Policy, as committed (no server needed)
# ---------------------------------------------------------------------------------------------
def test_committed_remote_config_and_push_policy() -> None:
    from configobj import ConfigObj  # DVC's own config parser

    cfg = ConfigObj(str(ROOT / ".dvc/config"))
    assert cfg["core"]["analytics"] == "false" and cfg["core"]["remote"] == "team"
    team = cfg['remote "team"']
    assert team["url"].startswith("s3://") and team["verify"] == "true"
    # Endpoints and credentials are per user (config.local / env): never in the committed file.
    assert not {"endpointurl", "access_key_id", "secret_access_key", "session_token", "credentialpath"} & set(team)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {k: v for s in stages.values() for o in s.get("outs", []) if isinstance(o, dict) for k, v in o.items()}
    outs |= {k: v for o in stages["merge"]["do"]["outs"] if isinstance(o, dict) for k, v in o.items()}
    never = {k for k, v in outs.items() if v.get("push") is False}
    assert never == {"models/base"}
    assert not any(k.startswith("models/checkpoints") for k in outs)  # resume state of one machine: not DVC's
    for pushed in ("data/processed", "models/stage1/adapter", "models/stage2/adapter", "models/${item}/merged",
                   "models/export"):
        assert outs[pushed].get("push", True) and outs[pushed].get("cache", True), pushed


# ---------------------------------------------------------------------------------------------
# Against the S3 server
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_push_wipe_pull_is_byte_exact_and_respects_push_false(repo_factory) -> None:  # noqa: ANN001
    repo = repo_factory()
    before = repo.files(*PUSHED)
    never = repo.objects_of("models/base")
    local = repo.cache_objects()
    assert before and never <= local

    repo.dvc("push")
    remote = set(repo.remote_objects())
    assert remote == local - never  # everything cached except the push: false base
    assert not remote & never
    repo.assert_remote_objects_whole()

    repo.wipe()
    repo.pull()
    assert repo.files(*PUSHED) == before  # byte for byte
    assert not (repo.path / "models/base").exists() and not (repo.path / "models/checkpoints").exists()
    status = repo.dvc("status", "-c")
    assert "in sync" in status.stdout, status.stdout
    # Fresh-clone flow from docs/sharing.md: rebuild the unpushed base, then nothing else reruns.
    repo.dvc("repro", "prepare-base")
    dry = repo.dvc("repro", "--dry").stdout
    assert "Stage 'train' didn't change" in dry and "Running stage 'train'" not in dry, dry


@pytest.mark.integration
def test_push_killed_midway_resumes_to_a_complete_remote(repo_factory) -> None:  # noqa: ANN001
    repo = repo_factory(n_files=400)
    expected = repo.cache_objects() - repo.objects_of("models/base")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-j", "1"], cwd=repo.path, env=repo.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not repo.remote_objects() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "push finished before it could be killed"
    partial = set(repo.remote_objects())
    assert partial and partial < expected, (len(partial), len(expected))
    repo.assert_remote_objects_whole()  # what did land is whole

    out = repo.dvc("push")
    assert f"{len(expected - partial)} files pushed" in out.stdout + out.stderr, out.stdout + out.stderr
    assert set(repo.remote_objects()) == expected
    repo.assert_remote_objects_whole()
    assert "in sync" in repo.dvc("status", "-c").stdout


@pytest.mark.integration
def test_corrupted_remote_object_is_refused_on_pull(repo_factory) -> None:  # noqa: ANN001
    repo = repo_factory()
    good = repo.files(*PUSHED)
    repo.dvc("push")
    adapter = repo.objects_of("models/stage1/adapter")
    (bad,) = [o for o in adapter if not o.endswith(".dir")]
    repo.s3.put_object(Bucket=repo.bucket, Key=repo.remote_objects()[bad], Body=b"not the adapter")

    # verify = true (committed): the downloaded object is re-hashed, dropped, and checkout refuses.
    repo.wipe()
    proc = repo.pull(check=False)
    assert proc.returncode != 0
    assert "Checkout failed" in proc.stderr and "models/stage1/adapter" in proc.stderr, proc.stderr
    assert not (repo.path / "models/stage1/adapter").exists()
    assert bad not in repo.cache_objects()
    assert repo.files("data/processed") == {k: v for k, v in good.items() if k.startswith("data/processed")}

    # Caveat documented in docs/sharing.md: --allow-missing turns that refusal into a silent gap.
    repo.wipe()
    proc = repo.dvc("pull", "--allow-missing")
    assert proc.returncode == 0 and not (repo.path / "models/stage1/adapter").exists()

    # Why verify is on: without it the wrong bytes land in the workspace and nothing complains.
    repo.wipe()
    repo.dvc("remote", "modify", "--local", "team", "verify", "false")
    repo.pull()
    assert (repo.path / "models/stage1/adapter/adapter_model.safetensors").read_bytes() == b"not the adapter"
