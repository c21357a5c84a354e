"""Fault injection for the kill-at-any-point guarantee of ``--overwrite`` (tests/test_bad_inputs.py).

    python tests/kill_points.py [--no-exchange] [--staging-once] [--record-only] TARGET SCRIPT [ARGS ...]

Points: just before and just after each change the console script file SCRIPT (run with ARGS)
makes to the file system: rename, replace, renameat2 exchange, mkdir, rmdir, unlink, remove, open
for writing. With ``--staging-once``, changes inside a staging folder (``.acnorm-new-``) after the
first one are no points (a kill there cannot reach the target; every change outside staging, and
the exchange, still is a point). With ``--no-exchange``, renameat2 is reported as unavailable (the
two-rename path). ``KILL_POINTS_TRACE=1`` lists the points on stderr.

1. Every point: SCRIPT runs once in a forked child that records, at each point, what is on disk
   then, which is what a ``kill -9`` at that point leaves (a killed process runs no more code).
   One JSON line per point: ``{"point", "what", "tree", "leftovers"}``; ``tree`` is {relative
   path: sha256} of TARGET (null if missing), ``leftovers`` the names beside TARGET that start with
   ``.<name>``. Then ``{"point": "end", "exit", "tree", "leftovers", "output"}``.
2. Real kills: SCRIPT runs again in children killed with SIGKILL at two of those points (right
   after the swap, and the one before the last); one line each, ``{"kill", "killed", "tree",
   "leftovers"}``. Every child starts from the old TARGET (copied aside at the start).
3. After the last kill, without restoring, a complete run: ``{"point": "rerun", ...}`` (what the
   killed runs left beside TARGET must be gone). Then TARGET is put back as it was.
   ``--record-only``: step 1 only.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (imported before forking, as the commands import it)

import nnunet_acnorm.outputs as outputs

_MUTATORS = ("rename", "replace", "mkdir", "rmdir", "unlink", "remove")
#: where each child's stdout and stderr go
_LOG = os.path.join(tempfile.gettempdir(), f"kill_points_{os.getpid()}.log")
_RECORD = os.path.join(tempfile.gettempdir(), f"kill_points_{os.getpid()}.jsonl")


def _tree(target: Path):
    if not target.is_dir():
        return None
    return {p.relative_to(target).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(target.rglob("*")) if p.is_file()}


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}"))


def _install(target: Path, kill_at: int | None, staging_once: bool, no_exchange: bool) -> None:
    """Hook the file-system changes: kill at point ``kill_at``, or (None) record every point."""
    state = {"points": 0, "staging_seen": False}
    record = None if kill_at is not None else open(_RECORD, "w")

    def counted(path, always: bool) -> bool:
        inside = ".acnorm-new-" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False
        if always or not staging_once or not inside:
            return True
        first, state["staging_seen"] = not state["staging_seen"], True
        return first

    def point(what: str) -> None:
        state["points"] += 1
        if os.environ.get("KILL_POINTS_TRACE"):
            print(f"point {state['points']}: {what:.200}", file=sys.stderr, flush=True)
        if state["points"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if record is not None:
            record.write(json.dumps({"point": state["points"], "what": what[:300], "tree": _tree(target),
                                     "leftovers": _leftovers(target)}) + "\n")
            record.flush()

    def hook(function, writes=lambda *a, **k: True, always=False):
        def wrapped(*args, **kwargs):
            if not writes(*args, **kwargs) or not counted(args[0] if args else "", always):
                return function(*args, **kwargs)
            point(f"before {function.__name__}{args!r}")
            result = function(*args, **kwargs)  # an exception skips the "after" point
            point(f"after {function.__name__}{args!r}")
            return result
        return wrapped

    for name in _MUTATORS:
        setattr(os, name, hook(getattr(os, name)))
    opener = hook(builtins.open, lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    builtins.open = io.open = opener
    exchange = (lambda a, b: False) if no_exchange else outputs.exchange_paths
    outputs.exchange_paths = hook(exchange, always=True)


def _child(target: Path, kill_at: int | None, script: str, args: list[str], options: dict) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        log = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            _install(target, kill_at, **options)
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _restore(target: Path, pristine: Path | None) -> None:
    for name in _leftovers(target):
        path = target.parent / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if target.is_dir():
        shutil.rmtree(target)
    if pristine is not None:
        shutil.copytree(pristine, target, symlinks=True)


def _line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _state(target: Path, status: int, output: bool = True) -> dict:
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "exit": os.waitstatus_to_exitcode(status), "tree": _tree(target),
            "leftovers": _leftovers(target), "output": Path(_LOG).read_text(errors="replace")[-3000:] if output else ""}


def main(argv: list[str]) -> None:
    options = {"no_exchange": "--no-exchange" in argv, "staging_once": "--staging-once" in argv}
    record_only = "--record-only" in argv
    argv = [a for a in argv if a not in ("--no-exchange", "--staging-once", "--record-only")]
    target, script, args = Path(argv[0]).absolute(), argv[1], argv[2:]
    aside = Path(tempfile.mkdtemp(prefix="kill_points_"))
    pristine = None
    if target.exists():
        pristine = aside / "old"
        shutil.copytree(target, pristine, symlinks=True)
    status = _child(target, None, script, args, options)  # 1. every point, recorded
    points = [json.loads(line) for line in Path(_RECORD).read_text().splitlines()]
    for p in points:
        _line(**p)
    _line(point="end", **_state(target, status))
    swapped = next((p["point"] for p in points if p["what"].startswith(("after exchange_paths", "after rename"))),
                   len(points) // 2)
    kills = [] if record_only else sorted({swapped, len(points) - 1})
    for k in kills:  # 2. real kills
        _restore(target, pristine)
        _line(kill=k, **_state(target, _child(target, k, script, args, options), output=False))
    if not record_only:
        status = _child(target, 0, script, args, options)  # 3. the next run after the last kill
        _line(point="rerun", **_state(target, status))
    _restore(target, pristine)  # as it was
    shutil.rmtree(aside)
    for path in (_LOG, _RECORD):
        os.remove(path)


if __name__ == "__main__":
    main(sys.argv[1:])
