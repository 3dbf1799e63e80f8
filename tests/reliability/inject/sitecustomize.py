"""Fault injection for the reliability suite, loaded by putting this folder first on PYTHONPATH.

Nothing happens unless KMED_FAULT is set, so DVC (which inherits the environment) and the stage it
runs both load this harmlessly. KMED_FAULT="module:Attr.path" wraps that callable as soon as `module`
is imported; the wrapper fires on the KMED_FAULT_NTH-th call (default 1) whose argument repr
contains KMED_FAULT_MATCH (default: any call), in the process whose command line contains
KMED_FAULT_ARGV (default: any). KMED_FAULT="module" (no attribute) fires when that module is imported.
KMED_FAULT_ACTION:

  kill         SIGKILL this process right after the call returns (the stage is killed mid-write)
  kill-before  SIGKILL this process just before the call (or the import)
  segv         SIGSEGV this process just before the call (or the import): a native library crashing in it
  hang         write KMED_FAULT_MARK, then wait until KMED_FAULT_RELEASE exists (or forever), then
               make the call as usual: the test acts on a stage frozen at a known point
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import os
import signal
import sys
import time

_SPEC = os.environ.get("KMED_FAULT", "")


def _fire_before(name: str) -> None:
    action = os.environ.get("KMED_FAULT_ACTION", "kill")
    if action == "kill-before":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "segv":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        mark, release = os.environ.get("KMED_FAULT_MARK"), os.environ.get("KMED_FAULT_RELEASE")
        if mark:
            with open(mark, "w") as f:
                f.write(f"{os.getpid()} {name}\n")
        while not (release and os.path.exists(release)):
            time.sleep(0.05)


def _fire_after() -> None:
    if os.environ.get("KMED_FAULT_ACTION", "kill") == "kill":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(fn, name: str):  # noqa: ANN001, ANN202
    match = os.environ.get("KMED_FAULT_MATCH", "")
    nth = int(os.environ.get("KMED_FAULT_NTH", "1"))
    count = [0]

    def hit(args: tuple, kwargs: dict) -> bool:
        try:
            text = repr(args) + repr(kwargs)
        except Exception:
            text = ""
        if match and match not in text:
            return False
        count[0] += 1
        return count[0] == nth

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if not hit(args, kwargs):
                return await fn(*args, **kwargs)
            _fire_before(name)
            out = await fn(*args, **kwargs)
            _fire_after()
            return out

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not hit(args, kwargs):
            return fn(*args, **kwargs)
        _fire_before(name)
        out = fn(*args, **kwargs)
        _fire_after()
        return out

    return wrapper


def _patch(module) -> None:  # noqa: ANN001
    owner = module
    *path, attr = _SPEC.split(":", 1)[1].split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, attr, _wrap(getattr(owner, attr), _SPEC))


class _Finder(importlib.abc.MetaPathFinder):
    """Patches the target module right after it executes, before anyone imports names from it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:  # noqa: ANN001
            if ":" not in _SPEC:  # the import itself is the fault
                _fire_before(_SPEC)
            exec_module(module)
            if ":" in _SPEC:
                _patch(module)

        spec.loader.exec_module = exec_and_patch
        sys.meta_path.remove(self)
        return spec


def _cmdline() -> str:
    # sys.argv is not final yet at startup (`python -m x` shows ['-m']): read what the kernel holds.
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return " ".join(sys.argv)


if _SPEC and os.environ.get("KMED_FAULT_ARGV", "") in _cmdline():
    _module = _SPEC.split(":", 1)[0]
    if _module in sys.modules and ":" in _SPEC:
        _patch(sys.modules[_module])
    elif _module not in sys.modules:
        sys.meta_path.insert(0, _Finder(_module))
