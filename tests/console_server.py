"""Run console scripts in forks of an interpreter that has already imported torch and the other heavy
libraries, instead of a fresh interpreter per call (tests/factories/nnunet.py ``run_console``).

Every call still runs the installed console script file as ``__main__`` with the test's arguments,
environment and working directory, in a process of its own (a fork, with its own process group, its
output in files, its exit status); what it no longer pays is the interpreter start and the import of
torch, torch._dynamo, matplotlib, SciPy, SimpleITK and nnU-Net's libraries, several seconds per call
(most of the run time of a refused command). Not preloaded: nnU-Net itself (``nnunetv2.paths`` and
``nnunetv2.configuration`` read the environment at import) and the plugin; they are imported by each
call, with the call's environment. The plugin's start-up hook (``_nnunet_acnorm_env``, run by the
``.pth`` at interpreter start) runs again in each fork after the environment is set, and torch's
thread count follows the call's ``OMP_NUM_THREADS``.

``ACNORM_TEST_FRESH_PROCESSES=1`` runs every console script in a fresh interpreter instead.

Server protocol (one server per idle slot of :class:`ServerPool`): the client writes one JSON line
``{"argv", "env", "cwd", "timeout", "out", "err"}`` to the server's stdin; the server forks, waits
(killing the fork's process group after ``timeout`` seconds) and answers one JSON line
``{"returncode", "timed_out"}`` on its stdout. End of input ends the server.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: set to 1 to run console scripts in fresh interpreters
FRESH_ENV = "ACNORM_TEST_FRESH_PROCESSES"
#: imported once by the server (none of them reads the nnU-Net or plugin environment at import)
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.distributed", "torch.multiprocessing", "scipy.ndimage",
           "scipy.special", "scipy.stats", "SimpleITK", "matplotlib", "matplotlib.pyplot", "sklearn.model_selection",
           "skimage.morphology", "pandas", "blosc2", "tqdm", "batchgenerators.utilities.file_and_folder_operations",
           "batchgeneratorsv2.transforms.spatial.spatial", "batchgeneratorsv2.transforms.nnunet.random_binary_operator",
           "batchgeneratorsv2.helpers.scalar_type", "dynamic_network_architectures.architectures.unet",
           "acvl_utils.cropping_and_padding.bounding_boxes", "seaborn", "nibabel", "PIL.Image", "imageio",
           "tifffile", "joblib", "rich", "yaml", "einops", "timm", "torchvision")


# -- server ------------------------------------------------------------------------------------------
def _exit_code(code) -> int:
    """The exit status Python gives ``SystemExit(code)`` (a message goes to stderr, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_child(request: dict) -> None:
    """In the fork: become the console script's process, run it, exit with its status."""
    code = 1
    try:
        os.setpgid(0, 0)  # a process group of its own: a timeout ends it and the workers it started
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT)):
            opened = os.open(name, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      write_through=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        import _nnunet_acnorm_env  # the start-up hook of the .pth, with this call's environment

        _nnunet_acnorm_env._append_trainer_folder()
        import torch

        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        argv = [str(a) for a in request["argv"]]
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as for a script run by its path
        import runpy

        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except BaseException:  # noqa: BLE001 - what an uncaught exception does: traceback, status 1
            import traceback

            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    finally:
        os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def serve() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # the answers; fd 1 itself is the forks' to replace
    os.dup2(2, 1)  # nothing a library prints can reach the answers
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a library this environment lacks is imported by the call itself
            pass
    protocol.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        returncode, timed_out = _wait(pid, float(request["timeout"]))
        try:
            os.killpg(pid, signal.SIGKILL)  # workers the script left behind end with it, as with a fresh process
        except (ProcessLookupError, PermissionError):
            pass
        protocol.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")


# -- client ------------------------------------------------------------------------------------------
def _text(path: str) -> str:
    """A file's bytes as subprocess.run(text=True) gives output: decoded, newlines translated."""
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        return f.read()


class _Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("tests/console_server.py did not start")

    def run(self, argv: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="console_") as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            self.process.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": cwd, "timeout": timeout,
                                                 "out": out, "err": err}) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
            if not answer:
                raise RuntimeError("tests/console_server.py ended unexpectedly")
            result = json.loads(answer)
            stdout, stderr = _text(out), _text(err)
        if result["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, result["returncode"], stdout, stderr)

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.process.kill()


class ServerPool:
    """Idle servers of this process; a call takes one (starting one if none is idle: calls from
    several threads run side by side) and gives it back."""

    def __init__(self) -> None:
        self._idle: list[_Server] = []
        self._all: list[_Server] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def run(self, argv: list[str], env: dict | None = None, cwd=None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
        with self._lock:
            server = self._idle.pop() if self._idle else None
        if server is None or server.process.poll() is not None:
            server = _Server()
            with self._lock:
                self._all.append(server)
        try:
            result = server.run([str(a) for a in argv], dict(os.environ if env is None else env),
                                os.path.abspath(cwd or os.getcwd()), timeout)
        except BaseException:
            server.close()
            raise
        with self._lock:
            self._idle.append(server)
        return result

    def close(self) -> None:
        for server in self._all:
            server.close()
        self._all.clear()
        self._idle.clear()


_POOL: ServerPool | None = None


def run(argv: list[str], env: dict | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)`` for a
    console script (``argv[0]``, a Python script), through a preloaded server (see the module)."""
    global _POOL
    if os.environ.get(FRESH_ENV) == "1":
        return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    if _POOL is None:
        _POOL = ServerPool()
    return _POOL.run(argv, env, cwd, timeout)


if __name__ == "__main__":
    serve()
