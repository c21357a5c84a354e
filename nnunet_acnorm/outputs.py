"""Where the commands write: one home for the rules every command follows with its outputs.

- :func:`check_output`: an output is refused when it is, contains or lies inside a model folder,
  input folder or file the command reads; when it is or contains one of nnU-Net's roots
  (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) or a dataset folder in them; when it
  is a symbolic link; or when it cannot be written (read-only folder).
- :func:`check_replaceable`: an existing output is replaced (``--overwrite``) only when every file
  in it is one the command writes (``owned``): nothing the command did not create is deleted. A
  symbolic link in it is never followed, written through or removed: the output is refused.
- :func:`replace_folder`: the new output is written into a folder beside the target
  (``.<name>.acnorm-new-<host>-<pid>``), swapped with the old one in one atomic rename (Linux
  ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, undone by the next run if a kill falls
  between them), then the old one is removed. A kill at any point leaves the old or the new output
  whole under its name. Leftovers of killed runs (only ``.<name>.acnorm-*`` folders of processes
  of this host that no longer run) are removed by the next run, with a line saying so.
- :func:`replaced_file`: the same for one file (a temporary file beside it, then ``os.replace``).
- :class:`RunLock`: one run at a time in a folder (``nnUNetv2_train`` of one fold): a lock file held
  with ``flock``; the lock of a process that died is taken over with a line saying so.

Examples::

    target = check_output(args.o, reads={"model folder": model_folder})
    check_replaceable(target, "-o", overwrite=args.overwrite, owned=lambda rel: rel in RESULT_FILES)
    replace_folder(target, lambda staging: write_results(result, staging))
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from nnunet_acnorm.errors import InputError

#: nnU-Net's folders (environment variables): an output may lie in them, never be or contain them
NNUNET_ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_DATASET_FOLDER = re.compile(r"Dataset\d{3,}_.+")
_STAGING_TAG = ".acnorm-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(InputError):
    """An output the command must not write or replace; the message says why and what to do."""


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def nnunet_roots() -> dict[str, Path]:
    """The nnU-Net roots set in the environment, resolved (unset or empty ones are left out)."""
    return {name: _real(os.environ[name]) for name in NNUNET_ROOTS if os.environ.get(name)}


def _writable_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing folder."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check_writable(path, option: str = "-o") -> None:
    """OutputError unless ``path`` (or, where it does not exist yet, the folder that would hold it)
    can be written."""
    path = Path(os.path.abspath(os.fspath(path)))
    existing = _writable_ancestor(path)
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {folder} cannot be written (read-only or no permission); choose a "
                          "folder you can write to")


def check_output(output, option: str = "-o", reads: Mapping[str, object] | None = None,
                 roots: bool = True) -> Path:
    """The absolute output path, or :class:`OutputError` when it is unsafe to write (see the module).

    Args:
        output: the output folder or file the user gave.
        option: the option that gave it, for the message (``-o``, ``--output``).
        reads: what the command reads, ``{description: path or list of paths}``; the output may
            not be, contain or lie inside any of them.
        roots: also refuse an output that is or contains an nnU-Net root or one of its dataset folders.
    """
    path = Path(os.path.abspath(os.fspath(output)))
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; give the folder it points to or another path "
                          "(links are never written through)")
    real = _real(path)
    for what, value in (reads or {}).items():
        for item in (value if isinstance(value, (list, tuple, set)) else [value]):
            if item is None:
                continue
            read = _real(item)
            relation = ("is" if real == read else "lies inside" if _inside(real, read)
                        else "contains" if _inside(read, real) else None)
            if relation:
                raise OutputError(f"{option} {path} {relation} the {what} {read}, which this command reads; "
                                  "choose an output outside it")
    if roots:
        _check_roots(path, real, option)
    check_writable(path, option)
    return path


def _check_roots(path: Path, real: Path, option: str) -> None:
    for name, root in nnunet_roots().items():
        if real == root or _inside(root, real):
            raise OutputError(f"{option} {path} {'is' if real == root else 'contains'} {name} ({root}); "
                              "choose a folder of its own")
        if real.parent == root and _DATASET_FOLDER.fullmatch(real.name):
            raise OutputError(f"{option} {path} is the dataset folder {real.name} of {name}; choose a folder of "
                              "its own")


def check_replaceable(target, option: str, overwrite: bool, owned: Callable[[str], bool], what: str,
                      empty_ok: bool = False) -> None:
    """OutputError unless ``target`` may be written: it does not exist; or ``empty_ok`` and it is an
    empty folder; or ``overwrite`` and it is a folder in which every file is ``owned`` (a relative
    path with ``/``) and nothing is a symbolic link, all of it writable.

    ``what`` names what the command writes there (``the results of nnUNetv2_acnorm_compare``)."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{option} {target} exists and is not a folder; choose another path")
    entries = sorted(_walk(target))
    if not entries and empty_ok:
        return
    if not overwrite:
        raise OutputError(f"{option} {target} exists{' and is not empty' if entries else ' (empty)'}; pass "
                          "--overwrite to replace it, or choose another folder")
    for relative, kind in entries:
        if kind == "link":
            raise OutputError(f"{option} {target}: {relative} is a symbolic link, which {what} never writes; "
                              "remove it or choose another folder (nothing was replaced)")
        if kind == "file" and not owned(relative):
            raise OutputError(f"{option} {target} holds {relative}, which is not one of {what}; --overwrite only "
                              "replaces a folder holding nothing else: choose another folder (nothing was replaced)")
    for folder in [target] + [target / r for r, kind in entries if kind == "dir"]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {target}: {folder} is read-only; its files could not be replaced")


def _walk(folder: Path) -> Iterator[tuple[str, str]]:
    """(relative path, ``file`` | ``dir`` | ``link``) of everything in ``folder``; links are not followed."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            full = Path(root) / name
            kind = "link" if full.is_symlink() else "dir" if full.is_dir() else "file"
            yield full.relative_to(folder).as_posix(), kind


# -- atomic replacement ------------------------------------------------------------------------
def _staging_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}{_STAGING_TAG}{kind}-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target, log: Callable[[str], None] = print) -> None:
    """Remove what killed runs of this host left beside ``target`` (their ``.<name>.acnorm-*``
    folders and files); an old output that a kill left beside a missing target is put back."""
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}{_STAGING_TAG}") + r"(new|old|tmp)-(.+)-(\d+)")
    if not target.parent.is_dir():
        return
    for entry in sorted(target.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or found.group(2) != socket.gethostname() or _alive(int(found.group(3))):
            continue
        if entry.is_symlink():
            continue  # not ours: we never create links
        if found.group(1) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            log(f"{target}: restored from {entry.name}, which a killed run left while replacing it")
        elif entry.is_dir():
            shutil.rmtree(entry)
            log(f"removed {entry}, left by a killed run (process {found.group(3)})")
        else:
            os.remove(entry)


def exchange_paths(a, b) -> bool:
    """Swap two existing paths in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot (then nothing was changed)."""
    renameat2 = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), os.fspath(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def replace_folder(target, write: Callable[[Path], None], log: Callable[[str], None] = print) -> None:
    """Write a new ``target`` folder with ``write(staging)`` beside it and put it in place atomically
    (see the module); on any error the staging folder goes and ``target`` is unchanged.

    The caller has checked ``target`` with :func:`check_output` / :func:`check_replaceable`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target, log)
    staging = _staging_name(target, "new")
    staging.mkdir()
    try:
        write(staging)
        _swap_in(staging, target)
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging)


def _swap_in(staging: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if exchange_paths(staging, target):
        shutil.rmtree(staging)  # now the old output
        return
    old = _staging_name(target, "old")
    os.rename(target, old)  # a kill from here to the next rename: the next run puts `old` back
    os.rename(staging, target)
    shutil.rmtree(old)


@contextlib.contextmanager
def replaced_file(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is renamed onto ``path``
    (``os.replace``: a link at ``path`` is replaced, never written through), else removed."""
    path = Path(path)
    tmp = _staging_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


# -- one run at a time -------------------------------------------------------------------------
class RunLockedError(InputError):
    """Another process holds the lock of a folder."""


class RunLock:
    """An exclusive lock file, ``flock``-ed for the life of the holder (released by the kernel when
    the process dies, even by ``kill -9``); the file names the holder (host, process id, start).

    Args:
        path: the lock file (its folder is created).
        what: what the lock guards, for the messages (``training of fold_0``).

    Examples::

        lock = RunLock(fold / "acnorm_train.lock", "training of fold_0").acquire(log)
        ...
        lock.release()
    """

    def __init__(self, path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd)
                os.close(fd)
                raise RunLockedError(f"another {self.what} is running ({_describe(holder)}; lock file {self.path}); "
                                     "wait for it to end (a second run would mix their checkpoints)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our flock: try again
        previous = _read_lock(fd)
        if previous.get("pid") is not None:
            log(f"{self.path}: took over the lock of {_describe(previous)}, which no longer runs")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise RunLockedError(f"cannot create the lock file {self.path} ({e.strerror}); "
                                 + ("it is a symbolic link: remove it" if e.errno == errno.ELOOP else
                                    "the folder must be writable")) from None

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_lock(fd: int) -> dict:
    try:
        content = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that did not record itself"
    return f"process {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
