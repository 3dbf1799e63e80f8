"""The DVC cache and the S3 remote: corruption and loss are found (`python -m kmed.verify`), never
checked out as if whole; an interrupted pull recovers; `dvc gc` with the documented flags keeps
experiments' objects.

Pushing killed mid-way and a corrupted remote object refused by `verify = true` are covered by
tests/test_remote.py (test_push_killed_midway_resumes_to_a_complete_remote,
test_corrupted_remote_object_is_refused_on_pull).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.reliability import kit
from tests.reliability.conftest import AWS, make_toy_repo

pytestmark = pytest.mark.reliability


def _cache(repo: Path) -> Path:
    return repo / ".dvc/cache/files/md5"


def _obj(repo: Path, md5: str) -> Path:
    return _cache(repo) / md5[:2] / md5[2:]


def _out_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s["outs"] if o["path"] == path)


def _entries(repo: Path, out: str = "out") -> list[dict]:
    return json.loads(_obj(repo, _out_md5(repo, out)).read_text())


def _flip_byte(path: Path, offset: int = 100) -> None:
    """Bit rot: one byte changes, mode and mtime do not."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(path, st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_byte_is_found_by_verify_and_not_by_dvc_status(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "toy")
    assert kit.verify(repo).returncode == 0
    # A byte flipped in a cache object of the directory output, and one in a workspace file.
    victim = _entries(repo)[5]
    _flip_byte(_obj(repo, victim["md5"]))
    _flip_byte(repo / "model.bin")

    status = kit.dvc(repo, "status")
    assert "Data and pipelines are up to date." in status.stdout  # DVC trusts mtime and read-only objects
    proc = kit.verify(repo)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert (
        f"CORRUPT: cache object .dvc/cache/files/md5/{victim['md5'][:2]}/{victim['md5'][2:]} of "
        f"'out/{victim['relpath']}' is corrupted" in "\n".join(lines)
    )
    assert any(ln.startswith("CORRUPT: workspace file model.bin differs from dvc.lock") for ln in lines)
    assert lines[-1].endswith("2 problem(s).")


def test_missing_cache_object_is_reported_and_never_checked_out_partial(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "toy")
    victim = _entries(repo)[3]
    _obj(repo, victim["md5"]).unlink()
    shutil.rmtree(repo / "out")

    proc = kit.dvc(repo, "checkout", check=False)
    assert proc.returncode != 0 and "Checkout failed for following targets:\nout" in proc.stderr, proc.stderr
    assert not (repo / "out").exists()  # refused as a whole: no directory with a file missing
    assert "not in cache:       out" in kit.dvc(repo, "status").stdout

    v = kit.verify(repo)
    assert v.returncode == 1
    assert "MISSING: workspace output 'out' is missing; run `dvc checkout out` (or `dvc pull`)." in v.stdout
    assert (
        f"MISSING: cache object .dvc/cache/files/md5/{victim['md5'][:2]}/{victim['md5'][2:]} of "
        f"'out/{victim['relpath']}' is missing"
    ) in v.stdout


def _with_remote(repo: Path, endpoint: str, tmp_path: Path) -> dict[str, str]:
    import boto3

    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    (tmp_path / "aws").write_text("")
    env = {
        **AWS,
        "AWS_CONFIG_FILE": str(tmp_path / "aws"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws"),
    }
    kit.dvc(repo, "remote", "add", "-d", "s3", f"s3://{bucket}/cache")
    kit.dvc(repo, "remote", "modify", "--local", "s3", "endpointurl", endpoint)
    kit.dvc(repo, "remote", "modify", "s3", "verify", "true")
    return env


def test_pull_killed_midway_recovers_on_rerun(tmp_path: Path, moto_s3: str) -> None:
    repo = make_toy_repo(tmp_path / "toy", n_files=300)
    env = _with_remote(repo, moto_s3, tmp_path)
    kit.dvc(repo, "push", **env)
    good = kit.digest(repo / "out", repo / "model.bin")
    n_objects = len(list(_cache(repo).rglob("*")))
    for p in (".dvc/cache", "out", "model.bin"):
        shutil.rmtree(repo / p) if (repo / p).is_dir() else (repo / p).unlink()

    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "pull", "-j", "1"],
        cwd=repo,
        env=kit.base_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        kit.wait_for(lambda: len(list(_cache(repo).rglob("*"))) > 60, 120, "the pull to get going", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    got = [p for p in _cache(repo).rglob("*") if p.is_file()]
    assert len(got) < n_objects  # really interrupted
    for p in got:  # what landed under an object's name is whole (downloads go to a temp name first)
        name = p.parent.name + p.name
        if not name.endswith(".dir") and ".tmp" not in name:
            assert hashlib.md5(p.read_bytes()).hexdigest() == name, p

    kit.dvc(repo, "pull", **env)
    assert kit.digest(repo / "out", repo / "model.bin") == good
    assert kit.verify(repo).returncode == 0
    assert "up to date" in kit.dvc(repo, "status").stdout


SAFE_GC = (
    "gc",
    "--workspace",
    "--all-commits",
    "--all-experiments",
    "--force",
)  # docs/sharing.md, docs/reliability.md


def test_gc_with_the_documented_flags_keeps_experiment_objects(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "toy", n_files=5, params=True)
    kit.dvc(repo, "exp", "run", "-n", "more-files", "-S", "n=8")
    exp_objects = [e["md5"] for e in _entries(repo)] + [_out_md5(repo, "out")]
    kit.git(repo, "checkout", "-q", "--", ".")
    kit.dvc(repo, "checkout", "-f", "-q")
    assert all(_obj(repo, m).exists() for m in exp_objects)

    kit.dvc(repo, *SAFE_GC)
    assert all(_obj(repo, m).exists() for m in exp_objects)  # the experiment is still restorable
    kit.dvc(repo, "exp", "apply", "more-files")
    kit.dvc(repo, "checkout", "-f", "-q")
    assert len(list((repo / "out").iterdir())) == 8
    kit.git(repo, "checkout", "-q", "--", ".")
    kit.dvc(repo, "checkout", "-f", "-q")

    kit.dvc(repo, "gc", "--workspace", "--force")  # what the flags prevent: the experiment's data is gone
    assert not any(_obj(repo, m).exists() for m in exp_objects[5:])


def test_gc_does_not_keep_queued_experiments_inputs(tmp_path: Path) -> None:
    """Pins the DVC 3.67 behaviour docs/reliability.md warns about: no gc flag keeps the data a *queued*
    experiment was queued with (it lives in a stash entry, not a commit or exp ref). Run or remove
    queued experiments before `dvc gc`."""
    repo = make_toy_repo(tmp_path / "toy", n_files=5, params=True)
    (repo / "extra.txt").write_text("tracked data v1\n")
    kit.dvc(repo, "add", "-q", "extra.txt")
    kit.git(repo, "add", "-A")
    kit.git(repo, "commit", "-qm", "extra")
    (repo / "extra.txt").write_text("tracked data v2, only in the queued experiment\n")
    kit.dvc(repo, "add", "-q", "extra.txt")
    v2 = hashlib.md5((repo / "extra.txt").read_bytes()).hexdigest()
    kit.dvc(repo, "exp", "run", "--queue", "-n", "queued", "-S", "n=6")
    kit.git(repo, "checkout", "-q", "--", ".")
    kit.dvc(repo, "checkout", "-f", "-q")
    assert "Queued" in kit.dvc(repo, "queue", "status").stdout and _obj(repo, v2).exists()

    kit.dvc(repo, *SAFE_GC)
    assert not _obj(repo, v2).exists()
