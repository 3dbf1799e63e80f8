"""The committed DVC cache link type (`.dvc/config`: `type = "hardlink,symlink"`): a large output is stored
once (workspace file and cache object are one inode), a rerun's atomic replace leaves the old cache object
whole, checkout / push / fresh-clone pull still work, `kmed.verify` still re-hashes through the links and
still finds a corrupted object; with the cache on another filesystem the outputs become symlinks.

The throwaway repos take `.dvc/config` as committed (as tests/test_remote.py does) and run a toy stage that
writes its output the way every real stage does (kmed.io.atomic_dir: a temporary sibling renamed over the
output), a few MB instead of a 65 GB merged model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.reliability import kit
from tests.stagekit import moto_s3_server

ROOT = Path(__file__).resolve().parents[1]
OUT = "models/merged"

STAGE_PY = '''"""Toy merge: python stage.py SEED MB -- MB of shards written as the real stages write (atomic_dir)."""
import random, sys
from pathlib import Path
from kmed.io import atomic_dir

OUT = Path("models/merged")
seed, mb = int(sys.argv[1]), int(sys.argv[2])
if OUT.exists():  # what DVC left in place before running us (persist: true)
    linked = [p for p in OUT.iterdir() if p.is_symlink() or p.stat().st_nlink > 1]
    print(f"linked at start: {len(linked)}", flush=True)
r = random.Random(seed)
with atomic_dir(OUT) as tmp:
    (tmp / "model-00001-of-00002.safetensors").write_bytes(r.randbytes((mb - mb // 2) << 20))
    (tmp / "model-00002-of-00002.safetensors").write_bytes(r.randbytes((mb // 2) << 20))
    (tmp / "config.json").write_text(f'{{"seed": {seed}}}\\n')
'''

DVC_YAML = """stages:
  merge:
    cmd: python stage.py ${seed} ${mb}
    deps: [stage.py]
    params: [seed, mb]
    outs:
      - models/merged:
          persist: true
"""

AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Toy:
    """A git+dvc repo with the committed .dvc/config (or another cache type) and the toy stage."""

    def __init__(
        self,
        path: Path,
        mb: int = 5,
        cache_type: str | None = "committed",
        cache_dir: Path | None = None,
        **env: str,
    ) -> None:
        self.path, self.env = path, env
        path.mkdir(parents=True, exist_ok=True)
        kit.git(path, "init", "-q")
        self.dvc("init", "-q")
        if cache_type == "committed":
            (path / ".dvc/config").write_text((ROOT / ".dvc/config").read_text())
        elif cache_type is not None:
            self.dvc("config", "cache.type", cache_type)
        if cache_dir is not None:
            self.dvc("cache", "dir", str(cache_dir))
        (path / "stage.py").write_text(STAGE_PY)
        (path / "dvc.yaml").write_text(DVC_YAML)
        self.params(seed=1, mb=mb)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kit.dvc(self.path, *args, check=check, **self.env)

    def params(self, **kv: int) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(kv))

    def commit(self, msg: str) -> None:
        kit.git(self.path, "add", "-A")
        kit.git(self.path, "commit", "-qm", msg)

    @property
    def cache(self) -> Path:
        d = self.dvc("cache", "dir").stdout.strip()
        return Path(d) / "files" / "md5"

    def entries(self) -> list[dict]:
        """The output's .dir manifest as recorded in dvc.lock: [{md5, relpath}, ...]."""
        lock = yaml.safe_load((self.path / "dvc.lock").read_text())
        md5 = lock["stages"]["merge"]["outs"][0]["md5"]
        return json.loads(self.obj(md5).read_text())

    def obj(self, md5: str) -> Path:
        return self.cache / md5[:2] / md5[2:]


@pytest.fixture(autouse=True)
def _isolated_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's DVC global/system config and site cache stay out of the temp repos."""
    for key, sub in (
        ("DVC_GLOBAL_CONFIG_DIR", "g"),
        ("DVC_SYSTEM_CONFIG_DIR", "s"),
        ("DVC_SITE_CACHE_DIR", "site"),
    ):
        monkeypatch.setitem(kit.ISOLATE, key, str(tmp_path / "dvc_home" / sub))


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


def _disk(paths: list[Path]) -> int:
    """Bytes the given files take on disk, each inode counted once (st_blocks, not st_size)."""
    seen: dict[tuple[int, int], int] = {}
    for p in paths:
        st = p.lstat()
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _assert_linked(toy: Toy, root: Path | None = None) -> list[Path]:
    """Every non-empty file of the output IS its cache object (same inode, or a symlink to it), read-only;
    output + cache take ~1x the output's size on disk. Returns the cache objects."""
    root = root or toy.path
    objs, ws = [], []
    for e in toy.entries():
        f, o = root / OUT / e["relpath"], toy.obj(e["md5"])
        assert _md5(f) == e["md5"] == _md5(o)
        if f.is_symlink():
            assert Path(os.readlink(f)) == o, (f, os.readlink(f))
        else:
            a, b = f.stat(), o.stat()
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink >= 2, (f, a, b)
        assert stat.S_IMODE(o.stat().st_mode) == 0o444  # writing through the link is refused (non-root)
        objs.append(o)
        ws.append(f)
    size = sum(f.stat().st_size for f in ws)
    assert size > 4 << 20
    assert _disk(ws + objs) < 1.05 * size, (_disk(ws + objs), size)  # once, not twice
    return objs


def _flip_byte(path: Path, offset: int = 4096) -> None:
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


def test_committed_cache_type_is_hardlink_then_symlink() -> None:
    from configobj import ConfigObj  # DVC's own config parser

    cfg = ConfigObj(str(ROOT / ".dvc/config"))
    assert cfg["cache"]["type"] == "hardlink,symlink"  # hardlink FIRST (see the comment there), no copy
    assert "dir" not in cfg["cache"]  # the cache stays in .dvc/cache, beside the workspace


@pytest.mark.integration
def test_large_output_is_stored_once_and_survives_rerun_checkout_push_pull(
    tmp_path: Path, s3_endpoint: str
) -> None:
    aws_home = tmp_path / "aws"
    aws_home.write_text("")
    env = {**AWS, "AWS_CONFIG_FILE": str(aws_home), "AWS_SHARED_CREDENTIALS_FILE": str(aws_home)}
    toy = Toy(tmp_path / "repo", **env)
    bucket = f"links-{uuid.uuid4().hex[:10]}"
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    toy.dvc("remote", "modify", "--local", "team", "url", f"s3://{bucket}/cache")
    toy.dvc("remote", "modify", "--local", "team", "endpointurl", s3_endpoint)

    # dvc repro: the new output is hardlinked into the cache (stored once), read-only.
    toy.dvc("repro")
    toy.commit("seed 1")
    first = {e["relpath"]: e["md5"] for e in toy.entries()}
    _assert_linked(toy)
    assert kit.verify(toy.path).returncode == 0

    # Rerun through DVC (params change): DVC first unprotects (copies) the persist output, the stage
    # replaces it atomically; the new output is linked, the old objects are whole.
    toy.params(seed=2, mb=5)
    proc = toy.dvc("repro")
    assert "linked at start: 0" in proc.stdout, proc.stdout  # DVC's unprotect copied them before the command
    toy.commit("seed 2")
    second = {e["relpath"]: e["md5"] for e in toy.entries()}
    _assert_linked(toy)
    for md5 in first.values():
        assert _md5(toy.obj(md5)) == md5  # seed 1 still restorable
    # Run directly, outside DVC (`python -m stages.<name>` in the README): the links are still in place
    # and the atomic replace renames over them instead of writing into the cache objects.
    direct = kit.run([kit.PY, "stage.py", "3", "5"], toy.path, env=kit.base_env())
    assert "linked at start: 3" in direct.stdout, direct.stdout
    for md5 in second.values():
        assert _md5(toy.obj(md5)) == md5
    assert "modified:" in toy.dvc("status").stdout
    v = kit.verify(toy.path, "--all-cache")
    assert (
        v.returncode == 1
        and "workspace file models/merged/model-00001-of-00002.safetensors differs" in v.stdout
    )
    problems = [ln for ln in v.stdout.splitlines() if ln.startswith(("CORRUPT:", "MISSING:"))]
    assert len(problems) == 3 and all(ln.startswith("CORRUPT: workspace file") for ln in problems), problems
    # (no cache object line: every object, seed 1's and seed 2's, still hashes to its name)
    toy.dvc("checkout", "-f")
    assert kit.verify(toy.path, "--all-cache").returncode == 0
    _assert_linked(toy)

    # Deleted output: `dvc checkout` restores it as links, byte-exact.
    shutil.rmtree(toy.path / OUT)
    toy.dvc("checkout")
    assert {e["relpath"]: e["md5"] for e in toy.entries()} == second
    _assert_linked(toy)

    # push, then a fresh clone pulls through the S3 server: byte-exact, linked there too, verify clean.
    toy.dvc("push")
    clone = tmp_path / "clone"
    kit.run(["git", "clone", "-q", str(toy.path), str(clone)], tmp_path)
    pulled = Toy.__new__(Toy)
    pulled.path, pulled.env = clone, env
    pulled.dvc("remote", "modify", "--local", "team", "url", f"s3://{bucket}/cache")
    pulled.dvc("remote", "modify", "--local", "team", "endpointurl", s3_endpoint)
    pulled.dvc("pull")
    assert {p.name: _md5(p) for p in (clone / OUT).iterdir()} == {
        p.name: _md5(p) for p in (toy.path / OUT).iterdir()
    }
    _assert_linked(pulled)
    assert kit.verify(clone).returncode == 0

    # A flipped byte in a cache object: kmed.verify finds it, in the object and (same inode) in the
    # workspace file; `dvc status` does not.
    victim = next(e for e in toy.entries() if e["relpath"].endswith(".safetensors"))
    _flip_byte(toy.obj(victim["md5"]))
    assert "up to date" in toy.dvc("status").stdout
    v = kit.verify(toy.path)
    assert v.returncode == 1
    o = toy.obj(victim["md5"])
    assert f"CORRUPT: cache object .dvc/cache/files/md5/{o.parent.name}/{o.name} of " in v.stdout
    assert f"CORRUPT: workspace file {OUT}/{victim['relpath']} differs from dvc.lock" in v.stdout
    assert v.stdout.splitlines()[-1].endswith("2 problem(s).")
    # The repair kmed.verify advises: delete the object and the workspace file, then pull.
    o.unlink()
    (toy.path / OUT / victim["relpath"]).unlink()
    toy.dvc("pull")
    assert kit.verify(toy.path, "--all-cache").returncode == 0
    _assert_linked(toy)


@pytest.mark.integration
def test_commit_needs_no_second_copy_of_the_output(tmp_path: Path) -> None:
    """On a disk with room for the output once but not twice, `dvc repro` (stage + commit) succeeds with the
    committed link type; with `copy` the commit runs out of space."""
    mb = 7
    with kit.tmpfs(tmp_path / "disk", "12m") as disk:
        toy = Toy(disk / "repo", mb=mb)
        toy.dvc("repro")
        _assert_linked(toy)
        free = shutil.disk_usage(disk).free
        assert free < mb << 20  # a second copy would not have fitted
        shutil.rmtree(toy.path)

        copy = Toy(disk / "copy", mb=mb, cache_type="copy")
        proc = copy.dvc("repro", check=False)
        said = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "No space left on device" in said, said[-2000:]


@pytest.mark.integration
def test_cache_on_another_filesystem_gives_symlinks(tmp_path: Path) -> None:
    """Hardlinks cannot cross filesystems: DVC falls back to the next type in the list (symlink), so the
    output is stored once, on the cache's disk; verify and checkout work through the symlinks."""
    with kit.tmpfs(tmp_path / "cachefs", "32m") as cachefs:
        toy = Toy(tmp_path / "repo", cache_dir=cachefs / "cache")
        toy.dvc("repro")
        files = [p for p in (toy.path / OUT).iterdir() if p.stat().st_size]
        assert files and all(p.is_symlink() for p in files)
        _assert_linked(toy)
        assert _disk(files) < 64 << 10  # the workspace disk holds links, not bytes
        assert kit.verify(toy.path).returncode == 0
        shutil.rmtree(toy.path / OUT)
        toy.dvc("checkout")
        _assert_linked(toy)
        victim = next(e for e in toy.entries() if e["relpath"].endswith(".safetensors"))
        _flip_byte(toy.obj(victim["md5"]))
        v = kit.verify(toy.path)
        assert (
            v.returncode == 1
            and "is corrupted" in v.stdout
            and f"{OUT}/{victim['relpath']} differs" in v.stdout
        )


def _reflinks_work(d: Path) -> bool:
    from dvc_objects.fs.system import reflink

    a, b = d / "probe-a", d / "probe-b"
    a.write_bytes(b"x" * 4096)
    try:
        reflink(str(a), str(b))
        return True
    except OSError:
        return False
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


@pytest.mark.integration
@pytest.mark.parametrize(
    "cache_type", [None, "reflink,hardlink,symlink,copy"], ids=["dvc-default", "reflink-first"]
)
def test_reflink_first_lists_store_twice_without_reflinks(tmp_path: Path, cache_type: str | None) -> None:
    """Pins why the committed list starts with hardlink: with reflink first, on a filesystem without reflinks
    DVC 3.67 copies the output into the cache at commit and does not relink the workspace (2x)."""
    if _reflinks_work(tmp_path):
        pytest.skip("this filesystem has reflinks: a reflink-first list stores once here")
    toy = Toy(tmp_path / "repo", cache_type=cache_type)
    toy.dvc("repro")
    ws = [toy.path / OUT / e["relpath"] for e in toy.entries()]
    objs = [toy.obj(e["md5"]) for e in toy.entries()]
    assert all(p.stat().st_nlink == 1 and not p.is_symlink() for p in ws)
    assert _disk(ws + objs) > 1.9 * sum(p.stat().st_size for p in ws)
