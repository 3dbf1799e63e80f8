"""Atomic outputs, JSON metrics, logging and lineage shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("kmed")

# Telemetry off: this is medical data. Set before any library that phones home is imported.
for _k, _v in {
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


class StageError(RuntimeError):
    """An expected failure with a one-sentence message (bad input, failed check, NaN loss...)."""


def gpu_free_planned(free: int, reserved: int = 0) -> int:
    """GPU bytes a stage plans with: `free` as CUDA reports it, capped at KMED_GPU_MEM_GB GiB less the `reserved`
    bytes this process's torch already holds. The cap is a machine fact, not a recipe param (e.g. 24 to behave
    as on an RTX 4090 while sharing a bigger card); doctor, load_for_inference and export's llama.cpp offload
    all read it here."""
    cap = os.environ.get("KMED_GPU_MEM_GB")
    return max(0, min(int(free), int(float(cap) * 2**30) - reserved)) if cap else max(0, int(free))

def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("KMED_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # unsloth configures logging on import; ours must still show
    )
    for noisy in ("urllib3", "filelock", "httpx", "botocore", "git", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); expected failures print one sentence and exit 2."""
    from kmed.config import ParamsError

    setup_logging()
    try:
        main()
    except (ParamsError, StageError) as e:
        log.error("%s", e)
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    A killed or failing stage leaves `final` as it was (plus a `.tmp-*` sibling that the next
    run removes), never a half-written directory under the real name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # A kill between the two renames below leaves the previous output at `.old-*`: put it back.
    for prev in final.parent.glob(f".{final.name}.old-*"):
        if final.exists():
            shutil.rmtree(prev, ignore_errors=True)
        else:
            prev.rename(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        full = no_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise StageError(f"No space left on device while writing {final} (partial copy removed, the previous "
                             f"{final.name} is untouched); free space under {final.parent} and rerun.") from e
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if no_space(e):
            raise StageError(f"No space left on device while writing {path} (the previous file is untouched); "
                             f"free space under {path.parent} and rerun.") from e
        raise
    os.replace(tmp, path)


def no_space(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` (or what it was raised from) is a full disk or quota: ENOSPC/EDQUOT, the text
    safetensors and tokenizers wrap it in, or torch.save's opaque writer error on a filesystem
    (the one holding `where`) that has under 1 MiB left."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        if where is not None and "inline_container" in str(e):  # torch's PytorchStreamWriter
            with contextlib.suppress(OSError):
                return shutil.disk_usage(where).free < 1 << 20
        e = e.__cause__ or e.__context__
    return False


def write_json(path: str | Path, obj: Any) -> None:
    """Stable, sorted JSON (byte-identical for identical content) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage(stage: str, params: dict[str, Any], wall_clock: bool = True, **extra: Any) -> dict[str, Any]:
    """What sits beside every model: resolved params, base id/revision, seed, code revision, and (unless
    `wall_clock` is false, for an output that must hash the same when rebuilt) when it was made."""
    model = params.get("model", {})
    out = {
        "stage": stage,
        "base_model": model.get("base"),
        "base_revision": model.get("revision"),
        "seed": params.get("train", {}).get("seed"),
        "code_revision": git_revision(),
        "params": params,
        **extra,
    }
    if wall_clock:
        out["created_unix"] = int(time.time())
    return out
