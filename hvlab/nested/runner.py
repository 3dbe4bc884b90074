"""The nested runner: run a command inside an L1 VM (QEMU TCG with nested SVM) where KVM works.

Why: /dev/kvm may be missing (many CI machines) or unable to run stock guests (kvm_pvm here).  QEMU's TCG
emulates an AMD CPU with SVM and nested paging, so KVM (kvm_amd) loads inside the L1 VM and runs stock
guests as L2.  The L1 sees the host's filesystem at the same paths (host root over 9p, read-only, under a
tmpfs overlay; chosen directories writable over their own 9p shares), runs the same command, and hands
back stdout, stderr and the exit status.  Starting Python over 9p is slow (seconds), so callers should run
one long-lived command per L1 (a whole test session, a whole ``hvlab boot``) rather than many short ones.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvlab import paths, progress
from hvlab.errors import HvlabError, KvmUnusable
from hvlab.kernel_log import OOPS_MARKS, STALL_MARKS, console_tail, first_line

FILES = Path(__file__).parent / "files"
L1_KERNEL = "l1-6.12"
L1_MODULES = ["virtio_pci", "9p", "9pnet_virtio", "overlay", "kvm_amd"]
L1_OPTIONAL_MODULES = ["virtio_console", "tun", "veth", "bridge", "af_packet", "vhost_net"]
# Environment variables carried into L1: what decides how Python and hvlab behave, nothing session-bound.
ENV_PASS_PREFIXES = ("HVLAB_", "PYTHON", "PYTEST", "VIRTUAL_ENV", "PYENV", "CI", "COLUMNS", "LANG", "LC_")
ENV_PASS = ("PATH", "HOME", "USER", "LOGNAME", "TERM", "TZ", "XDG_CACHE_HOME")
IN_L1_ENV = "HVLAB_IN_L1"
L1_CMDLINE = "quiet loglevel=5 tsc=reliable nokaslr panic=-1 rdinit=/init kvm_amd.nested=1 kvm_amd.npt=1"
"""L1's kernel command line after the console.

- loglevel=5 keeps warnings, among them the stack dumps of an RCU stall report, which say where a stuck
  L1 CPU was (L1's console is a file: no cost to the guest).
- tsc=reliable: TCG's TSC is the host's (one clock for every vCPU), but L1's clocksource watchdog, reading
  the HPET and the TSC with a TCG scheduling delay between them, saw a 2 ms "skew" in the first L2 boot,
  marked the TSC unstable and fell back to the HPET (an emulated MMIO read per clock read); KVM in L1
  then warned "SMP vm created on host with unstable TSC; guest TSC will not be reliable".
- nokaslr: L1's symbols (``_kallsyms_path``) then name the functions its CPUs are in when a silent L1
  is killed.
- ``module.param=value`` reaches that module (l1-init passes them to insmod); ``$HVLAB_L1_APPEND`` adds
  more, for experiments (e.g. ``kvm_amd.npt=0``)."""
QEMU = "qemu-system-x86_64"
L1_FATAL_MARKS = STALL_MARKS + OOPS_MARKS
"""Console lines after which an L1 is killed: a stalled CPU, a hung task, an oops (``hvlab.kernel_log``)."""


class NestedTimeout(HvlabError):
    """The L1 VM ran out of its time limit and was killed (a crash is a plain HvlabError)."""


@dataclass
class NestedConfig:
    """How to build the L1 VM.  Memory must hold the L2 guests plus the tmpfs overlay's writes."""

    memory_mb: int = 6144
    cpus: int = 2
    timeout: float = 3600.0
    start_timeout: float = 300.0
    """Seconds L1 may take to boot and start the command (it takes 20-60 s); beyond that it is stuck
    and killed as a crash, so a caller can retry instead of waiting out ``timeout``."""
    heartbeat_timeout: float = 90.0
    """Seconds without L1's heartbeat (l1-init prints it every 10 s) after which it is killed as silent."""
    quiet_timeout: float | None = None
    """Seconds without growth of the command's output or of ``activity`` files after which L1 is
    killed as stuck; None: no such limit (a command may legitimately be quiet)."""
    activity: list[Path] = field(default_factory=list)
    writable: list[Path] = field(default_factory=list)
    keep_dir: Path | None = None


def qemu_binary() -> str | None:
    """The system QEMU (or ``$HVLAB_L1_QEMU``), the fallback that runs L1 when hvlab's QEMU 11 root is absent."""
    return shutil.which(os.environ.get("HVLAB_L1_QEMU") or QEMU)


@dataclass
class L1Qemu:
    """How L1 is run: the command (before QEMU's own arguments), extra environment, TCG threading."""

    command: list[str]
    env: dict[str, str]
    tcg_thread: str
    label: str


def l1_qemu() -> L1Qemu | None:
    """Choose the QEMU for L1.

    hvlab's QEMU 11 root (built by the qemu room, ``hvlab qemu``; cached) with multi-threaded TCG is
    preferred: in a 15-boot stress run in one L1 it ran clean, where QEMU 7.2 single-threaded (Debian
    12's) panicked guests about once in 13 boots (an interrupt delivered twice, docs/DESIGN.md) and 7.2's
    multi-threaded TCG oopsed L1's KVM. ``$HVLAB_L1_QEMU`` forces a given binary (with
    ``$HVLAB_L1_TCG_THREAD``, default single); ``HVLAB_L1_QEMU=system`` forces Debian's QEMU.
    """
    forced = os.environ.get("HVLAB_L1_QEMU")
    thread = os.environ.get("HVLAB_L1_TCG_THREAD")
    if forced and forced != "system":
        path = shutil.which(forced)
        return L1Qemu([path], {}, thread or "single", forced) if path else None
    if not forced:
        from hvlab.qemu.root import QemuRoot

        root = QemuRoot()
        if root.ready:
            env = {k: v for k, v in root.env().items() if k.startswith("QEMU")}
            return L1Qemu(root.command(), env, thread or "multi", "QEMU 11 (hvlab's root)")
    path = shutil.which(QEMU)
    return L1Qemu([path], {}, thread or "single", "system QEMU") if path else None


def in_l1() -> bool:
    """Whether this process already runs inside the nested runner's L1 (no recursion)."""
    return os.environ.get(IN_L1_ENV) == "1"


def _l1_kit() -> tuple[Path, Path]:
    """The L1 kernel and its initramfs (fetched and built once, then cached)."""
    from hvlab.guest import initramfs, kernels

    kernel = kernels.fetch(L1_KERNEL)
    init = (FILES / "l1-init").read_text()
    initrd = initramfs.build(kernel, modules=L1_MODULES, optional_modules=L1_OPTIONAL_MODULES, init=init)
    return kernel.vmlinuz, initrd


def _command_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["# written by hvlab's nested runner", "set -e"]
    keep = {k: v for k, v in env.items() if k in ENV_PASS or k.startswith(ENV_PASS_PREFIXES)}
    keep[IN_L1_ENV] = "1"
    lines.append("unset $(env | sed -n 's/=.*//p') 2>/dev/null || true")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(keep.items())]
    lines.append(f"cd {shlex.quote(cwd)}")
    lines.append("set +e")
    lines.append(shlex.join(argv))
    return "\n".join(lines) + "\n"


class _Tail(threading.Thread):
    """Copy a file QEMU's serial port writes to one of our streams, as it grows."""

    def __init__(self, path: Path, out) -> None:
        super().__init__(daemon=True)
        self.path, self.out = path, out
        self.stop = threading.Event()

    def run(self) -> None:
        sink = self.out.buffer if hasattr(self.out, "buffer") else self.out
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    sink.write(chunk)
                    sink.flush()
                    continue
                if self.stop.is_set():
                    return
                time.sleep(0.05)


@dataclass
class NestedResult:
    returncode: int
    console_log: Path
    seconds: float


L1_STARTED = b"hvlab-l1: running"
"""What l1-init prints on its console once the shares are mounted and the command starts."""


class GrowingFile:
    """A file another process (or VM) is still writing: each look returns the complete lines it gained
    since the last one; a partial last line waits for the next look."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        return data[:cut].splitlines()


L1_ALIVE = b"hvlab-l1: alive"
"""What l1-init prints every 10 s while the command runs: L1 still schedules tasks."""


@dataclass(frozen=True)
class Verdict:
    """Why the runner must kill an L1 that is still running."""

    kind: str
    """"timeout" (out of ``config.timeout``), "boot" (no command started within ``start_timeout``),
    "silent" (no heartbeat for ``heartbeat_timeout``: no L1 CPU runs tasks any more, so none is left to
    report it), "quiet" (the command's output and activity files did not grow for ``quiet_timeout``:
    L1 lives but the command is stuck past its own timeouts) or "kernel" (L1's kernel reported a
    stalled CPU, a hung task or an oops)."""
    detail: str

    @property
    def alive(self) -> bool:
        """Whether L1's kernel may still run its tasks (so asking it for task dumps can work)."""
        return self.kind in ("quiet", "kernel")


def _sizes(files: list[Path]) -> tuple[int, ...]:
    out = []
    for f in files:
        try:
            out.append(f.stat().st_size)
        except OSError:
            out.append(-1)
    return tuple(out)


def _watch(proc: subprocess.Popen, console: Path, config: NestedConfig,
           activity: list[Path] | None = None) -> Verdict | None:
    """Wait for QEMU to exit (None) or for a reason to kill it (a Verdict).

    Under the L0 emulator an L1 CPU can get stuck in kernel mode; every L1 task queued there (an L2
    vCPU thread, pytest's main thread) then never runs again and no timeout inside L1 fires.  If the
    other CPU still runs, L1's kernel says so on its console ("kernel"); if none does, the heartbeat
    stops ("silent"); if L1 runs but the command is stuck anyway, its output stops growing ("quiet").
    """
    t0 = time.monotonic()
    started = False
    log = GrowingFile(console)
    files = list(activity or [])
    sizes, grown, beat = _sizes(files), t0, t0
    while proc.poll() is None:
        now = time.monotonic()
        elapsed = now - t0
        if elapsed > config.timeout:
            return Verdict("timeout", f"the L1 VM did not finish within {config.timeout:.0f} s")
        lines = log.new_lines()
        if not started and any(L1_STARTED in line for line in lines):
            started, beat, grown = True, now, now
        if any(L1_ALIVE in line for line in lines):
            beat = now
        trouble = first_line(b"\n".join(lines).decode(errors="replace"), L1_FATAL_MARKS)
        if trouble is not None:
            return Verdict("kernel", f"the L1 VM's kernel reported trouble ({trouble})")
        if not started and elapsed > config.start_timeout:
            return Verdict("boot", f"the L1 VM did not start the command within {config.start_timeout:.0f} s")
        if started and now - beat > config.heartbeat_timeout:
            return Verdict("silent", f"the L1 VM went silent (no heartbeat for {now - beat:.0f} s: no L1 CPU "
                                     "runs tasks any more)")
        new = _sizes(files)
        if new != sizes:
            sizes, grown = new, now
        if started and config.quiet_timeout is not None and now - grown > config.quiet_timeout:
            return Verdict("quiet", f"the command in the L1 VM made no progress for {now - grown:.0f} s "
                                    "(its output and reports stopped growing)")
        time.sleep(0.5)
    return None


SYSRQ_DUMPS = "w l"
"""What an L1 that is alive but stuck is asked to print before it is killed (magic SysRq): w, the
blocked tasks with their stacks; l, a backtrace of every active CPU."""


def _ask_for_task_dumps(xchg: Path, wait: float = 20.0) -> None:
    """Leave a SysRq request in the exchange directory; l1-init's heartbeat loop carries it out and
    removes the file.  Wait for that (or ``wait`` seconds), then a little for the dump to reach the console."""
    request = xchg / "sysrq"
    request.write_text(SYSRQ_DUMPS + "\n")
    deadline = time.monotonic() + wait
    while request.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not request.exists():
        time.sleep(3.0)


def _diagnose(verdict: Verdict, xchg: Path, symbols: Path) -> list[str]:
    """Evidence from an L1 about to be killed: task dumps (if it can still run tasks) on its console,
    and where its CPUs are (from QEMU), also saved as ``l1-cpus.txt``."""
    from hvlab.nested.monitor import cpu_report
    from hvlab.system_map import SystemMap

    if verdict.alive:
        _ask_for_task_dumps(xchg)
    try:
        smap = SystemMap.load(symbols)
    except OSError:
        smap = None
    return cpu_report(xchg / "monitor.sock", smap, xchg / "l1-cpus.txt")


def _kallsyms_path(initrd: Path) -> Path:
    """Where L1's code symbols are kept: beside its initramfs, whose name is a hash of the kernel
    release, the modules and the init (with ``nokaslr`` and the same modules loaded in the same order,
    every L1 boot has the same addresses).  Debian's System.map is a stub (the real one is in the -dbg
    package), so the first L1 on a machine writes its /proc/kallsyms there (about 1.5 s in L1)."""
    return initrd.with_name(initrd.name.split(".")[0] + ".kallsyms")


def run_nested(argv: list[str], config: NestedConfig | None = None, *, stdout=None, stderr=None) -> NestedResult:
    """Run ``argv`` inside a fresh L1 VM; stream its output to ``stdout``/``stderr`` (default: ours)."""
    config = config or NestedConfig()
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    qemu = l1_qemu()
    if qemu is None:
        raise KvmUnusable(f"the nested runner needs {QEMU} (Debian: apt-get install qemu-system-x86)")
    t0 = time.monotonic()
    vmlinuz, initrd = _l1_kit()
    symbols = _kallsyms_path(initrd)
    xchg = Path(tempfile.mkdtemp(prefix="hvlab-l1-", dir=config.keep_dir))
    writable = [paths.cache_dir(), *config.writable]
    shares = []
    # Debian 12's QEMU 7.2 runs single-threaded: with its multi-threaded TCG, L1's live kernel patching
    # (static keys toggled by KVM while guests run) raced with the other vCPU, which then hit the patch's
    # INT3: an oops in kvm_arch_vcpu_ioctl_run on the second guest of a session (see l1_qemu()).
    args = [*qemu.command, "-accel", f"tcg,thread={qemu.tcg_thread}", "-cpu", "EPYC,+svm,+npt", "-smp", str(config.cpus),
            "-m", str(config.memory_mb), "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", f"console=ttyS0 {L1_CMDLINE} {os.environ.get('HVLAB_L1_APPEND', '')}".strip(),
            "-serial", f"file:{xchg / 'console.log'}",
            "-monitor", f"unix:{xchg / 'monitor.sock'},server=on,wait=off",
            "-serial", f"file:{xchg / 'stdout'}",
            "-serial", f"file:{xchg / 'stderr'}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={xchg},mount_tag=xchg,security_model=none,multidevs=remap"]
    for i, path in enumerate(dict.fromkeys(p.resolve() for p in writable)):
        path.mkdir(parents=True, exist_ok=True)
        tag = f"rw{i}"
        shares.append(f"{tag} {path}")
        args += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"]
    (xchg / "shares").write_text("\n".join(shares) + "\n")
    if not symbols.exists():
        (xchg / "kallsyms-to").write_text(f"{symbols}\n")  # l1-init saves them there, once
    (xchg / "command.sh").write_text(_command_script(argv, os.getcwd(), dict(os.environ)))
    for name in ("stdout", "stderr", "console.log"):
        (xchg / name).touch()
    progress.say(f"starting L1 VM ({qemu.label}, TCG {qemu.tcg_thread}-threaded, nested SVM, {config.cpus} vCPUs, "
                 f"{config.memory_mb} MiB)")
    tails = [_Tail(xchg / "stdout", stdout), _Tail(xchg / "stderr", stderr)]
    for t in tails:
        t.start()
    qemu_log = open(xchg / "qemu.log", "wb")  # noqa: SIM115 (closed below; a pipe could fill and block QEMU)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                            start_new_session=True, env={**os.environ, **qemu.env})
    interrupted, verdict, evidence = False, None, []
    try:
        verdict = _watch(proc, xchg / "console.log", config,
                         [xchg / "stdout", xchg / "stderr", *config.activity])
        if verdict is not None:
            progress.say(f"{verdict.detail}; collecting evidence before killing it")
            evidence = _diagnose(verdict, xchg, symbols)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for t in tails:
            t.stop.set()
        for t in tails:
            t.join(timeout=5)
        qemu_log.close()
    # QEMU warns about every EPYC feature TCG lacks; keep only real errors for the message
    qemu_out = "\n".join(line for line in (xchg / "qemu.log").read_text(errors="replace").splitlines()
                          if "TCG doesn't support requested feature" not in line).strip()
    console = xchg / "console.log"
    seconds = time.monotonic() - t0
    if interrupted:
        raise KeyboardInterrupt
    if verdict is not None:
        where = ("where L1's CPUs were (QEMU's monitor; " + str(xchg / "l1-cpus.txt") + "):\n  "
                 + "\n  ".join(evidence) + "\n") if evidence else ""
        message = (f"{verdict.detail} and was killed after {seconds:.0f} s.\n{where}"
                   f"L1's console ({console}) ends:\n{console_tail(console)}")
        raise (NestedTimeout if verdict.kind == "timeout" else HvlabError)(message)
    status_file = xchg / "exit-status"
    if not status_file.exists():
        raise HvlabError("the L1 VM stopped without running the command to its end "
                         f"(QEMU exit {proc.returncode}{': ' + qemu_out if qemu_out else ''}); "
                         f"console log {console}:\n{console_tail(console)}")
    rc = int(status_file.read_text().strip() or 255)
    if config.keep_dir is None and rc == 0:
        shutil.rmtree(xchg, ignore_errors=True)
    return NestedResult(rc, console, seconds)
