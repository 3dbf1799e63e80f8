"""Re-hash every DVC-tracked output, in the workspace and in the local cache, against dvc.lock.

    python -m kmed.verify [--no-workspace] [--no-cache] [--all-cache]

`dvc status` trusts its state database (inode, mtime, size) and never re-reads the cache, so a byte
flipped in `.dvc/cache/files/md5/xx/yyy...` or in a workspace file whose mtime was kept goes
unnoticed until a checkout or pull hands out bad data. This reads every byte instead: each output
of each stage (and each `.dvc` file) with an md5 in dvc.lock, each file of a directory output
through its `.dir` manifest, and (with `--all-cache`) every object in the cache against its own
name, which also covers old commits' and experiments' objects. Every problem is printed as one
sentence; the exit status is 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def manifest_md5(entries: list[dict[str, Any]]) -> str:
    """md5 of a `.dir` manifest as DVC computes it (entries without meta, sorted by relpath)."""
    canon = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(canon, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest()


@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)
    objects: int = 0
    files: int = 0
    _cache_ok: dict[str, bool] = field(default_factory=dict)

    def rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def add(self, sentence: str) -> None:
        self.problems.append(sentence)


def _cache_path(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def check_cache_object(rep: Report, cache: Path, md5: str, what: str) -> bool:
    """Is the cache object for `md5` present and intact? Each object is hashed once per run."""
    if md5 in rep._cache_ok:
        return rep._cache_ok[md5]
    p = _cache_path(cache, md5)
    ok = True
    if not p.is_file():
        rep.add(
            f"cache object {rep.rel(p)} of {what} is missing; run `dvc pull` or `dvc repro` to restore it."
        )
        ok = False
    else:
        rep.objects += 1
        got = md5_file(p)
        if got != md5:
            rep.add(
                f"cache object {rep.rel(p)} of {what} is corrupted (its md5 is {got}, expected {md5}); "
                "delete it, then `dvc pull` or `dvc repro` to restore it."
            )
            ok = False
    rep._cache_ok[md5] = ok
    return ok


def load_manifest(rep: Report, cache: Path, md5dir: str, out: str) -> list[dict[str, Any]] | None:
    p = _cache_path(cache, md5dir)
    if not p.is_file():
        rep.add(
            f"directory manifest {rep.rel(p)} of {out!r} is missing from the cache, so its files cannot be "
            "checked; run `dvc pull` or `dvc repro` to restore it."
        )
        return None
    rep.objects += 1
    raw = p.read_bytes()
    want = md5dir.removesuffix(".dir")
    try:
        entries = json.loads(raw)
        assert isinstance(entries, list) and all("md5" in e and "relpath" in e for e in entries)
    except (ValueError, AssertionError, TypeError):
        rep.add(
            f"directory manifest {rep.rel(p)} of {out!r} is corrupted (not a valid manifest); "
            "delete it and run `dvc pull` or `dvc repro`."
        )
        return None
    got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if got != want and manifest_md5(entries) != want:
        rep.add(
            f"directory manifest {rep.rel(p)} of {out!r} is corrupted (its md5 is {got}, expected {want}); "
            "delete it and run `dvc pull` or `dvc repro`."
        )
        return None
    rep._cache_ok[md5dir] = True
    return entries


def check_workspace_file(rep: Report, path: Path, md5: str, out: str) -> None:
    if not path.is_file():
        rep.add(f"workspace file {rep.rel(path)} of {out!r} is missing; run `dvc checkout {out}`.")
        return
    rep.files += 1
    got = md5_file(path)
    if got != md5:
        rep.add(
            f"workspace file {rep.rel(path)} differs from dvc.lock (md5 {got}, expected {md5}): it was "
            f"modified or corrupted; delete it and run `dvc checkout {out}` to restore the recorded version "
            "(`dvc checkout -f` alone trusts the file's unchanged mtime and keeps it)."
        )


def tracked_outputs(root: Path) -> tuple[list[tuple[str, str, bool, Path]], Path]:
    """(name, md5 or md5.dir, cached, workspace path) of every output with a recorded hash, and the
    cache's object folder (`.dvc/cache/files/md5`, or under `cache.dir` when the cache was moved)."""
    from dvc.repo import Repo

    outs = []
    with Repo(str(root)) as repo:
        cache = Path(repo.cache.local.path)
        for stage in repo.index.stages:
            for out in stage.outs:
                hi = out.hash_info
                if not hi or not hi.value or hi.name not in ("md5", "md5-dos2unix"):
                    continue
                outs.append((out.def_path, hi.value, bool(out.use_cache), Path(out.fs_path)))
    return outs, cache


def verify(root: Path, workspace: bool = True, cache_check: bool = True, all_cache: bool = False) -> Report:
    root = root.resolve()
    rep = Report(root)
    outs, cache = tracked_outputs(root)
    for name, md5, cached, path in outs:
        if workspace and not path.exists():
            rep.add(f"workspace output {name!r} is missing; run `dvc checkout {name}` (or `dvc pull`).")
            workspace_here = False
        else:
            workspace_here = workspace
        if md5.endswith(".dir"):
            # An uncached directory output has no manifest to check its files against.
            entries = load_manifest(rep, cache, md5, name) if cached else None
            for e in entries or []:
                if cache_check:
                    check_cache_object(rep, cache, e["md5"], repr(f"{name}/{e['relpath']}"))
                if workspace_here:
                    check_workspace_file(rep, path / e["relpath"], e["md5"], name)
        else:
            if cached and cache_check:
                check_cache_object(rep, cache, md5, repr(name))
            if workspace_here:
                check_workspace_file(rep, path, md5, name)
    if all_cache and cache.is_dir():
        for p in sorted(cache.glob("??/*")):
            oid = p.parent.name + p.name
            if oid in rep._cache_ok or not p.is_file() or ".tmp" in p.name or ".lock" in p.name:
                continue
            if p.name.endswith(".dir"):
                load_manifest(rep, cache, oid, f"cache object {oid}")
            else:
                check_cache_object(rep, cache, oid, "an unreferenced or older version")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmed.verify", description=__doc__.splitlines()[0])
    ap.add_argument("--no-workspace", action="store_true", help="do not re-hash workspace files")
    ap.add_argument("--no-cache", action="store_true", help="do not re-hash cache objects")
    ap.add_argument(
        "--all-cache",
        action="store_true",
        help="also re-hash every object in .dvc/cache against its own name",
    )
    ap.add_argument("--root", default=".", help="repository root (default: the current directory)")
    a = ap.parse_args(argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    root = Path(a.root)
    if not (root / ".dvc").is_dir():
        print(f"ERROR: {root.resolve()} is not a DVC repository (no .dvc folder).", file=sys.stderr)
        return 2
    rep = verify(root, workspace=not a.no_workspace, cache_check=not a.no_cache, all_cache=a.all_cache)
    for s in rep.problems:
        print(f"CORRUPT: {s}" if "corrupted" in s or "differs" in s else f"MISSING: {s}")
    status = "OK" if not rep.problems else f"{len(rep.problems)} problem(s)"
    print(f"kmed.verify: {rep.objects} cache objects and {rep.files} workspace files re-hashed: {status}.")
    return 1 if rep.problems else 0


if __name__ == "__main__":
    sys.exit(main())
