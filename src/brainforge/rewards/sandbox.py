"""Running untrusted generated Python, bounded.

Each program runs in a fresh process that:
* lives in a throw-away working directory (deleted afterwards) with a minimal environment;
* has no network: it is moved into a new, empty network namespace before it starts
  (as root directly, otherwise through a user namespace). If neither is possible the
  sandbox refuses to run instead of running with network;
* when started as root, drops to the `nobody` user, so it cannot write the project's or
  the user's files and the process-count limit applies to it;
* runs under resource limits: CPU seconds, address space, number of processes, size of
  files it writes (its stdout/stderr go to files, so this also caps output);
* is killed with its whole process group when the wall-clock limit passes;
* has a Python audit hook that refuses sockets, subprocesses, fork/exec and opening files
  for writing outside its directory (defence in depth on top of the above).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from brainforge.errors import BrainforgeError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

RUNNER = textwrap.dedent(
    '''
    import os, sys
    _root = os.path.realpath(os.getcwd())
    _blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "pty.", "os.kill", "ctypes.")
    def _hook(event, args):
        if event.startswith(_blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(m in args[1] for m in "wax+"):
            path = os.path.realpath(str(args[0]))
            if not path.startswith(_root):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
    sys.addaudithook(_hook)
    _source = open("program.py").read()
    exec(compile(_source, "program.py", "exec"), {"__name__": "__main__"})
    '''
)


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 1024
    max_processes: int = 16
    max_output_bytes: int = 64_000


@dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="brainforge-sandbox-"))
    try:
        (workdir / "program.py").write_text(program)
        (workdir / "runner.py").write_text(RUNNER)
        as_root = os.geteuid() == 0
        if as_root:
            nobody = pwd.getpwnam("nobody")
            os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
            for name in ("program.py", "runner.py"):
                os.chown(workdir / name, nobody.pw_uid, nobody.pw_gid)
        stdout_path, stderr_path = workdir / "stdout.txt", workdir / "stderr.txt"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [_interpreter(as_root), "-I", "-B", "runner.py"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env={"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                preexec_fn=_child_setup(limits, as_root), start_new_session=True,
            )
            timed_out = False
            try:
                process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)
        returncode = process.returncode
        if returncode == _SETUP_FAILED:
            raise BrainforgeError(
                "the code sandbox cannot cut the network on this machine (no permission to create a network "
                "namespace, even through a user namespace); refusing to run generated code with network access"
            )
        return SandboxResult(returncode, _read_capped(stdout_path, limits), _read_capped(stderr_path, limits), timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_SETUP_FAILED = 97


def _interpreter(as_root: bool) -> str:
    """A Python the sandbox user may execute: ours, unless it sits under a private folder
    (e.g. a venv under /root), then a system one. Only the standard library is needed."""
    candidates = [sys.executable] + ([shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""] if as_root else [])
    for candidate in candidates:
        if candidate and (not as_root or _world_executable(Path(candidate))):
            return candidate
    raise BrainforgeError("the code sandbox found no Python interpreter that an unprivileged user may run")


def _world_executable(path: Path) -> bool:
    real = path.resolve()
    if not real.is_file() or not os.stat(real).st_mode & 0o001:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in real.parents)


def _child_setup(limits: SandboxLimits, as_root: bool):
    """Runs in the child between fork and exec: isolate, then limit, then (root) drop to nobody."""
    nobody = pwd.getpwnam("nobody") if as_root else None

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            os._exit(_SETUP_FAILED)
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_output_bytes, limits.max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nobody is not None:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

    return setup


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_capped(path: Path, limits: SandboxLimits) -> str:
    with path.open("rb") as handle:
        return handle.read(limits.max_output_bytes).decode("utf-8", errors="replace")
