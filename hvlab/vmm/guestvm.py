"""A booted hvlab guest: machine + legacy devices + ACPI + initramfs + agent, with a per-run directory.

This is what ``hvlab boot`` and the pytest fixtures use: ``with GuestVM(config) as vm: vm.wait_ready();
vm.agent.run("uname -r")``.  Every run gets ``<runs>/<time>-<kernel>/`` with the complete console log
(the console is quiet by default because every console byte is a KVM exit) and ``meta.json``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvlab import paths, progress
from hvlab.agent.host import Agent
from hvlab.errors import GuestError, HvlabError
from hvlab.kernel_log import PANIC_MARK, stall_line
from hvlab.timeline import Timeline
from hvlab.vmm import layout as L
from hvlab.vmm.acpi import build_acpi_tables
from hvlab.vmm.devices.cmos import Cmos
from hvlab.vmm.devices.power import PmDevice, ResetPort
from hvlab.vmm.devices.uart import Uart16550
from hvlab.vmm.machine import Machine, MachineConfig, StopReason

EXIT_PANIC = 6
EXIT_VMM_ERROR = 7


class GuestPanic(GuestError):
    exit_code = EXIT_PANIC


class GuestHang(GuestError):
    """The guest is running but its agent stopped answering; the message carries where each vCPU
    was (see GuestVM.diagnose)."""


class VmmFailure(HvlabError):
    exit_code = EXIT_VMM_ERROR


class GuestTripleFault(VmmFailure):
    """A vCPU shut down (KVM_EXIT_SHUTDOWN) without a panic message: the guest could not even run its
    double-fault handler."""


@dataclass
class GuestVMConfig:
    kernel: object  # hvlab.guest.kernels.Kernel
    smp: int = 2
    mem_mb: int = 1024
    append: str = ""
    verbose: bool = False
    boot_timeout: float = 300.0
    extra_modules: list[str] = field(default_factory=list)
    console_echo: object | None = None  # a binary stream that also gets the console (verbose/interactive)
    heartbeat_interval: float = 1.0
    nics: int = 1
    """Synthetic NICs (netvsp) on hvlab's switch; NIC 0 gets 192.0.2.2/24 once the agent is up."""
    net_setup: bool = True
    """Configure NIC 0's address in wait_ready (False: leave the guest's network untouched)."""
    pcap: bool = False
    """Write a pcap per switch port into the run directory."""
    vmbus_devices: list = field(default_factory=list)
    """Extra VMBus device models (hvlab.vmbus.device.VmbusDevice) offered at boot, besides the ICs."""


class Console:
    """The guest console (ttyS0): always to console.log; optionally echoed; the tail kept for panics;
    each complete line also goes to the run's timeline, so host events and guest messages interleave,
    and the first stall warning (hvlab.kernel_log) is kept in ``stall``."""

    def __init__(self, path: Path, echo=None, timeline=None) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed by GuestVM.close)
        self.echo = echo
        self.timeline = timeline
        self.tail = bytearray()
        self._line = bytearray()
        self.lock = threading.Lock()
        self.stall: str | None = None
        """The first console line reporting a stalled guest CPU, if any."""

    def write(self, data: bytes) -> None:
        with self.lock:
            self.file.write(data)
            self.tail += data
            if len(self.tail) > 65536:
                del self.tail[:-32768]
            if data.endswith(b"\n"):
                self.file.flush()
            self._line += data
            while (nl := self._line.find(b"\n")) >= 0:
                line = self._line[:nl].rstrip(b"\r").decode(errors="replace")
                del self._line[:nl + 1]
                if line:
                    self._on_line(line)
            if len(self._line) > 4096:
                self._on_line(self._line.decode(errors="replace"))
                self._line.clear()
        if self.echo is not None:
            self.echo.write(data)
            self.echo.flush()

    def _on_line(self, line: str) -> None:
        if self.timeline is not None:
            self.timeline.event("console", line=line)
        if self.stall is None:
            self.stall = stall_line(line)

    def close(self) -> None:
        with self.lock:
            self.file.close()


class GuestVM:
    """Boot a guest and talk to it.  Use as a context manager so the VM always ends."""

    def __init__(self, config: GuestVMConfig) -> None:
        from hvlab.guest import initramfs

        self.config = config
        kernel = config.kernel
        t0 = time.monotonic()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = paths.runs_dir() / f"{stamp}-{kernel.label}-{int(t0 * 1000) % 100000}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with progress.step(f"building the initramfs for {kernel.label} ({kernel.release})"):
            self.initrd = initramfs.build_guest_initramfs(
                kernel, extra_modules=config.extra_modules)
        cmdline = "console=ttyS0 panic=-1 reboot=acpi"
        if not config.verbose:
            # loglevel=4: errors still reach the console (RCU stalls, hung tasks, driver failures) so a
            # guest that goes silent leaves a clue in console.log; they are rare, so the exits are cheap.
            cmdline += " quiet loglevel=4"
        if config.append:
            cmdline += " " + config.append
        self.machine = Machine(MachineConfig(kernel=kernel.vmlinuz, initrd=self.initrd, cmdline=cmdline,
                                             mem_mb=config.mem_mb, smp=config.smp))
        m = self.machine
        self.timeline = Timeline(self.run_dir / "timeline.jsonl")
        self.console = Console(self.run_dir / "console.log", config.console_echo, self.timeline)
        self.uart0 = Uart16550(L.COM1_PORT, on_output=self.console.write,
                               set_irq=lambda level: m.irq_line(L.COM1_IRQ, level))
        # A stalled guest CPU ends every wait for the agent: its answer may depend on that CPU.
        self.agent = Agent(self._agent_send, alive=lambda: not m.stopped and self.console.stall is None)
        self.uart1 = Uart16550(L.COM2_PORT, on_output=self.agent.on_output,
                               set_irq=lambda level: m.irq_line(L.COM2_IRQ, level))
        self.pm = PmDevice(on_power_off=lambda: m.stop(StopReason("poweroff", "ACPI S5")),
                           set_sci=lambda level: m.irq_line(L.SCI_IRQ, level))
        self.reset_port = ResetPort(on_reset=lambda: m.stop(StopReason("reset", "reset register")))
        for dev in (self.uart0, self.uart1, Cmos(), self.pm, self.reset_port):
            m.add_io_device(dev)
        from hvlab.hyperv.platform import HypervPlatform

        self.hyperv = HypervPlatform(m)
        self._start_vmbus()
        tables = build_acpi_tables(n_cpus=config.smp)
        m.load(tables.blob)
        self.meta: dict = {"kernel": kernel.label, "release": kernel.release, "cmdline": cmdline,
                           "smp": config.smp, "mem_mb": config.mem_mb}
        self.t_start = time.monotonic()
        m.start()
        self.t_ready: float | None = None
        self.guest_iface: str | None = None
        """NIC 0's interface name in the guest, once wait_ready configured it."""
        self.last_diagnosis = ""

    def _start_vmbus(self) -> None:
        """The VMBus server on the platform, its event loop, and the devices every guest gets: the
        Heartbeat, Shutdown and TimeSync services (hv_utils), plus ``config.vmbus_devices``.

        The server shares the machine lock: hypercalls and MSR writes (EOM) arrive on vCPU threads
        already holding it, and one lock for the whole machine cannot deadlock."""
        from hvlab.devices.ic import HeartbeatDevice, ShutdownDevice, TimeSyncDevice
        from hvlab.vmbus.loop import EventLoop
        from hvlab.vmbus.server import VmbusServer

        m = self.machine
        self.loop = EventLoop(lock=m.lock, name="hvlab-vmbus-loop")
        self.vmbus = VmbusServer(self.hyperv.port, m.memory, timeline=self.timeline, lock=m.lock)
        self.hyperv.attach_vmbus(self.vmbus)
        self.vmbus.install_backstop(self.loop)
        self.heartbeat = HeartbeatDevice(scheduler=self.loop, interval=self.config.heartbeat_interval)
        self.shutdown_ic = ShutdownDevice(scheduler=self.loop)
        self.timesync = TimeSyncDevice(scheduler=self.loop, reference_counter=self.hyperv.reference_counter)
        self.net = None
        if self.config.nics:
            from hvlab.vmm.guestnet import GuestNetwork

            self.net = GuestNetwork(self.config.nics, scheduler=self.loop, timeline=self.timeline,
                                    pcap_dir=self.run_dir if self.config.pcap else None)
        nics = self.net.nics if self.net is not None else []
        for dev in (self.heartbeat, self.shutdown_ic, self.timesync, *nics, *self.config.vmbus_devices):
            self.vmbus.add_device(dev)
        self.loop.start()

    def _agent_send(self, data: bytes) -> None:
        with self.machine.lock:
            self.uart1.feed(data)

    def wait_ready(self) -> float:
        """Wait for the agent; returns seconds from VM start.  Raises GuestPanic/VmmFailure/GuestError."""
        if self.t_ready is None:
            try:
                self.agent.wait_ready(self.config.boot_timeout)
            except GuestError as exc:
                self._raise_if_dead()
                if self.console.stall is not None:
                    raise self._hang(exc) from exc
                raise GuestError(f"{exc} (where the vCPUs were: {self.diagnose(str(exc))})") from exc
            self.t_ready = time.monotonic() - self.t_start
            progress.say(f"guest ready in {self.t_ready:.1f} s ({self.machine.stats.total()} exits to user space)")
            if self.net is not None and self.config.net_setup:
                self.guest_iface = self.net.configure_guest(self.run)
                progress.say(f"guest {self.guest_iface}: {self.net.guest_mac} 192.0.2.2/24; "
                             "responder 192.0.2.1")
        return self.t_ready

    def stop_reason(self) -> StopReason | None:
        if not self.machine.stopped:
            return None
        reason = self.machine.wait(0)
        if reason is not None and PANIC_MARK in self.console.tail and reason.kind in ("reset", "triple-fault",
                                                                                      "panic", "poweroff"):
            start = self.console.tail.find(PANIC_MARK)
            return StopReason("panic", self.console.tail[start:start + 200].decode(errors="replace").strip())
        return reason

    def _raise_if_dead(self) -> None:
        reason = self.stop_reason()
        if reason is None:
            return
        if reason.kind == "panic":
            raise GuestPanic(f"the guest kernel panicked: {reason.detail} (console: {self.run_dir / 'console.log'})")
        if reason.kind == "triple-fault":
            raise GuestTripleFault(f"the guest triple-faulted: {reason.detail} "
                                   f"(console: {self.run_dir / 'console.log'})")
        if reason.kind == "error":
            raise VmmFailure(f"the VM failed: {reason.detail} (console: {self.run_dir / 'console.log'})")
        raise GuestError(f"the guest stopped ({reason.kind}: {reason.detail})")

    def run(self, command: str, timeout: float = 60.0):
        """Run a shell command in the guest (see hvlab.agent.host.Agent.run).  A guest that stops
        answering raises GuestError with a diagnosis of where each vCPU is (also kept in the run
        directory), because "no answer" alone cannot tell a hung guest from a host that stopped
        serving it."""
        try:
            return self.agent.run(command, timeout=timeout)
        except GuestError as exc:
            self._raise_if_dead()
            raise self._hang(exc) from exc

    def _hang(self, exc: GuestError) -> GuestHang:
        """The GuestHang for a live guest whose agent did not answer: why (a stall the guest kernel
        reported, else the agent's error), where each vCPU is, and the file that keeps it."""
        why = str(exc)
        if self.console.stall is not None:
            why = f"the guest kernel reported a stalled CPU: {self.console.stall!r} (waiting for the agent stopped)"
        path = self.diagnose(why)
        return GuestHang(f"{why}\n{self.last_diagnosis}\n(diagnosis kept in {path})")

    def diagnose(self, why: str) -> Path:
        """Write where the vCPUs are, the VMBus channels' ring state and the console tail to
        ``hang-N.txt`` in the run directory and the timeline; returns the file."""
        report = self.machine.vcpu_report()
        lock = self.machine.lock
        if lock.acquire(timeout=2):
            try:
                bus = json.dumps(self.vmbus.snapshot(), indent=1)
            finally:
                lock.release()
        else:
            bus = f"(the machine lock is held elsewhere: {lock!r})"
        self.last_diagnosis = report
        self.timeline.event("diagnosis", why=why, vcpus=report)
        n = sum(1 for _ in self.run_dir.glob("hang-*.txt")) + 1
        path = self.run_dir / f"hang-{n}.txt"
        tail = self.console.tail.decode(errors="replace")[-2000:]
        path.write_text(f"{why}\n\n{report}\n\nVMBus:\n{bus}\n\nconsole tail:\n{tail}\n")
        return path

    def shutdown(self, timeout: float = 10.0) -> StopReason:
        """Shut the guest down gracefully through the Hyper-V Shutdown service (hv_utils runs
        orderly_poweroff), as a real host does; fall back to the agent's ``poweroff -f`` when the
        service is not there (no hv_utils) or the guest does not act on it; then wait for the VM."""
        if not self.machine.stopped:
            self.shutdown_path = "shutdown-ic"
            if not self.shutdown_ic.request_shutdown(force=True, message="hvlab: run finished"):
                self.shutdown_path = "agent"
                self.agent.fire("poweroff -f")
            elif self.machine.wait(min(timeout, 5.0)) is None:
                self.shutdown_path = "agent (shutdown service ignored)"
                self.agent.fire("poweroff -f")
            if self.machine.wait(timeout) is None:
                self.machine.stop(StopReason("stopped", f"guest did not power off within {timeout:.0f} s"))
        return self.stop_reason() or StopReason("stopped")

    def interactive(self) -> int:
        """Console on this terminal until the guest powers off (Ctrl-] ends it)."""
        import os
        import select
        import termios
        import tty

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
        self.console.echo = sys.stdout.buffer
        sys.stdout.buffer.write(self.console.tail)
        sys.stdout.flush()
        try:
            if old is not None:
                tty.setraw(fd)
            while not self.machine.stopped:
                r, _, _ = select.select([fd], [], [], 0.2)
                if r:
                    data = os.read(fd, 1024)
                    if not data or b"\x1d" in data:
                        break
                    with self.machine.lock:
                        self.uart0.feed(data)
        finally:
            if old is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
        reason = self.stop_reason()
        if reason is None:
            self.machine.stop(StopReason("stopped", "console closed"))
            return 0
        return {"poweroff": 0, "panic": EXIT_PANIC}.get(reason.kind, EXIT_VMM_ERROR)

    def close(self) -> None:
        if not self.machine.stopped:
            self.machine.stop(StopReason("stopped", "closed by host"))
        self.machine.wait(2)
        self.loop.stop()
        self.hyperv.close()
        if self.net is not None:
            self.net.close()
        reason = self.stop_reason()
        self.meta.update({
            "stop": {"kind": reason.kind, "detail": reason.detail} if reason else None,
            "ready_seconds": self.t_ready,
            "run_seconds": time.monotonic() - self.t_start,
            "exits": dict(self.machine.stats.by_kind),
            "exits_by_port": {hex(k): v for k, v in self.machine.stats.by_port.most_common(20)},
            "shutdown_path": getattr(self, "shutdown_path", None),
            "vmbus": self.vmbus.snapshot(),
            "heartbeats": self.heartbeat.beats,
            "doorbell_signals": self.hyperv.doorbells.signals,
            "hypercalls": self.hyperv.stats["hypercalls"],
            "net": self.net.snapshot() if self.net is not None else None,
        })
        (self.run_dir / "meta.json").write_text(json.dumps(self.meta, indent=2))
        self.machine.close()
        self.console.close()
        self.timeline.close()

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
