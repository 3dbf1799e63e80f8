"""Helpers of the reliability suite: subprocess runners, fault injection, digests, tmpfs, git+dvc repos."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject"  # sitecustomize.py: the fault injector
PY = sys.executable
BIN = str(Path(PY).parent)
ISOLATE: dict[str, str] = {}  # DVC's global/system config and site cache dirs, set by conftest per session


def base_env(**extra: str) -> dict[str, str]:
    """Offline, no telemetry, MLflow off, identity for git, the venv first on PATH (dvc.yaml says `python`),
    the fault injector (inert unless KMED_FAULT is set) first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMED_FAULT", "MLFLOW_", "DVC_EXP"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": f"{INJECT}{os.pathsep}{ROOT}",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "KMED_MLFLOW": "0",
            "DVC_NO_ANALYTICS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "2",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
            "GIT_CONFIG_GLOBAL": os.devnull,
            **ISOLATE,
        }
    )
    env.update(extra)
    return env


def fault(
    target: str,
    *,
    match: str = "",
    nth: int = 1,
    action: str = "kill",
    argv: str = "",
    mark: Path | None = None,
    release: Path | None = None,
) -> dict[str, str]:
    """Environment that makes tests/reliability/inject/sitecustomize.py fire (see its docstring)."""
    env = {
        "KMED_FAULT": target,
        "KMED_FAULT_MATCH": match,
        "KMED_FAULT_NTH": str(nth),
        "KMED_FAULT_ACTION": action,
        "KMED_FAULT_ARGV": argv,
    }
    if mark is not None:
        env["KMED_FAULT_MARK"] = str(mark)
    if release is not None:
        env["KMED_FAULT_RELEASE"] = str(release)
    return env


def run(
    cmd: list[str], cwd: Path, *, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def stage(
    wd: Path, module: str, *args: str, check: bool = True, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m stages.<name>` in a workdir, with the repo's code (the workdir holds no code)."""
    return run([PY, "-m", module, *args], wd, check=check, timeout=timeout, env=base_env(**env))


def dvc(
    repo: Path, *args: str, check: bool = True, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "dvc", *args], repo, check=check, timeout=timeout, env=base_env(**env))


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["git", *args], repo)


def verify(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m kmed.verify` on a repo (the repo's own kmed/ when it carries one, else this repo's)."""
    return run([PY, "-m", "kmed.verify", *args], repo, check=False, env=base_env())


def error_lines(stderr: str) -> list[str]:
    """The stage's one-sentence errors (run_stage prints `ERROR: ...`), without DVC's own."""
    return [
        ln.removeprefix("ERROR: ")
        for ln in stderr.splitlines()
        if ln.startswith("ERROR: ") and not ln.startswith("ERROR: failed to reproduce")
    ]


def digest(*paths: Path) -> dict[str, str]:
    """md5 of every file under the given files/folders (absent paths give no entries)."""
    out = {}
    for root in paths:
        files = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*") if p.is_file())
            if root.exists()
            else []
        )
        for p in files:
            out[str(p)] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def siblings(final: Path, kind: str = "tmp") -> list[Path]:
    """The `.name.tmp-PID` / `.name.old-PID` siblings kmed.io.atomic_dir leaves while writing `final`."""
    return sorted(final.parent.glob(f".{final.name}.{kind}-*"))


def wait_for(
    pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (a disk that fills up); skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command on this machine: cannot simulate a full disk")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode}): "
            "cannot simulate a full disk"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def copy_pipeline(dst: Path, base_dir: Path) -> None:
    """The pipeline's code, params and sample data as committed, plus a base model, into a fresh folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, dst / name)
    for pkg in ("kmed", "stages"):
        (dst / pkg).mkdir()
        for f in (ROOT / pkg).glob("*.py"):
            shutil.copy2(f, dst / pkg / f.name)
    for d in ("data/samples", "data/raw"):
        shutil.copytree(ROOT / d, dst / d)
    shutil.copytree(base_dir, dst / "models/base")


def init_git_dvc(repo: Path, ignore: str = "") -> None:
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    (repo / ".gitignore").write_text("__pycache__/\nmlruns/\n" + ignore)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
