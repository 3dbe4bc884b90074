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
from hvlab.kernel_log import stall_line

FILES = Path(__file__).parent / "files"
L1_KERNEL = "l1-6.12"
L1_MODULES = ["virtio_pci", "9p", "9pnet_virtio", "overlay", "kvm_amd"]
L1_OPTIONAL_MODULES = ["virtio_console", "tun", "veth", "bridge", "af_packet", "vhost_net"]
# Environment variables carried into L1: what decides how Python and hvlab behave, nothing session-bound.
ENV_PASS_PREFIXES = ("HVLAB_", "PYTHON", "PYTEST", "VIRTUAL_ENV", "PYENV", "CI", "COLUMNS", "LANG", "LC_")
ENV_PASS = ("PATH", "HOME", "USER", "LOGNAME", "TERM", "TZ", "XDG_CACHE_HOME")
IN_L1_ENV = "HVLAB_IN_L1"
L1_CMDLINE = "quiet loglevel=5 tsc=reliable panic=-1 rdinit=/init kvm_amd.nested=1 kvm_amd.npt=1"
"""L1's kernel command line after the console.

- loglevel=5 keeps warnings, among them the stack dumps of an RCU stall report, which say where a stuck
  L1 CPU was (L1's console is a file: no cost to the guest).
- tsc=reliable: TCG's TSC is the host's (one clock for every vCPU), but L1's clocksource watchdog, reading
  the HPET and the TSC with a TCG scheduling delay between them, saw a 2 ms "skew" in the first L2 boot,
  marked the TSC unstable and fell back to the HPET (an emulated MMIO read per clock read); KVM in L1
  then warned "SMP vm created on host with unstable TSC; guest TSC will not be reliable".
- ``module.param=value`` reaches that module (l1-init passes them to insmod); ``$HVLAB_L1_APPEND`` adds
  more, for experiments (e.g. ``kvm_amd.npt=0``)."""
QEMU = "qemu-system-x86_64"


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


def _watch(proc: subprocess.Popen, console: Path, config: NestedConfig) -> str | None:
    """Wait for QEMU to exit; None if it did, else why the caller must kill it:

    - "timeout": out of ``config.timeout``;
    - "boot": no command started within ``start_timeout`` (a stuck L1 boot, reported early);
    - a console line: L1's own kernel reported a stalled CPU.  Under the L0 emulator an L1 CPU can get
      stuck in kernel mode; every L1 task queued there (an L2 vCPU thread, pytest's main thread) then
      never runs again and no timeout inside L1 fires, so the L1 is as good as dead.
    """
    t0 = time.monotonic()
    started = False
    log = GrowingFile(console)
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        if elapsed > config.timeout:
            return "timeout"
        lines = log.new_lines()
        started = started or any(L1_STARTED in line for line in lines)
        text = b"\n".join(lines).decode(errors="replace")
        stall = stall_line(text)
        if stall is not None:
            return stall
        if not started and elapsed > config.start_timeout:
            return "boot"
        time.sleep(0.5)
    return None


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
    interrupted, why = False, None
    try:
        why = _watch(proc, xchg / "console.log", config)
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
    if why == "timeout":
        raise NestedTimeout(f"the L1 VM did not finish within {config.timeout:.0f} s and was killed; "
                         f"its console log: {console}")
    if why is not None:
        tail = console.read_text(errors="replace").strip().splitlines()[-15:]
        what = (f"the L1 VM did not start the command within {config.start_timeout:.0f} s" if why == "boot"
                else f"the L1 VM's kernel reported a stalled CPU ({why})")
        raise HvlabError(f"{what} and was killed; console log {console}:\n" + "\n".join(tail))
    status_file = xchg / "exit-status"
    if not status_file.exists():
        tail = console.read_text(errors="replace").strip().splitlines()[-15:]
        raise HvlabError("the L1 VM stopped without running the command to its end "
                         f"(QEMU exit {proc.returncode}{': ' + qemu_out if qemu_out else ''}); "
                         f"console log {console}:\n" + "\n".join(tail))
    rc = int(status_file.read_text().strip() or 255)
    if config.keep_dir is None and rc == 0:
        shutil.rmtree(xchg, ignore_errors=True)
    return NestedResult(rc, console, seconds)
