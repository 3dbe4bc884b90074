"""The machine: guest RAM, vCPU threads, the exit loop, and the legacy devices a Linux kernel needs.

Each vCPU runs KVM_RUN in its own thread (ctypes releases the GIL inside the ioctl).  Exits are handled
on that thread: port I/O and MMIO go to the devices on the buses; MSR exits go to an optional handler (the
Hyper-V platform installs one); shutdown, reset and internal errors end the run.  Devices and the host
side (agent, VMBus) share one lock, ``Machine.lock``, because a serial port or a ring may be touched from
a vCPU thread and from the event loop at once.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hvlab.kvm import abi
from hvlab.kvm.memory import GuestMemory
from hvlab.kvm.system import Kvm, KvmError, Vcpu
from hvlab.vmm import layout as L
from hvlab.vmm import pagewalk
from hvlab.vmm.bus import IoBus, MmioBus
from hvlab.vmm.cpuid import guest_cpuid, guest_xcr0

KICK_SIGNAL = signal.SIGUSR1
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1


@dataclass
class MachineConfig:
    """What to boot and how big.  ``cmdline`` is the complete kernel command line."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = "console=ttyS0 quiet panic=-1"
    mem_mb: int = 1024
    smp: int = 2
    acpi: bool = True


@dataclass
class StopReason:
    """Why the run ended: ``poweroff``, ``reset``, ``panic``, ``triple-fault``, ``error``, ``stopped``."""

    kind: str
    detail: str = ""


MsrHandler = Callable[[Vcpu, int, bool, int], "int | None"]


@dataclass
class ExitStats:
    """Counts of user-space exits by kind (and port for I/O), for benchmarks and debugging."""

    by_kind: Counter = field(default_factory=Counter)
    by_port: Counter = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.by_kind.values())


_EXIT_KINDS = {abi.KVM_EXIT_IO: "io", abi.KVM_EXIT_MMIO: "mmio", abi.KVM_EXIT_X86_RDMSR: "rdmsr",
               abi.KVM_EXIT_X86_WRMSR: "wrmsr", abi.KVM_EXIT_HLT: "hlt", abi.KVM_EXIT_INTR: "intr"}


def _vectors(lapic: bytes, base: int) -> str:
    """The set bits of a 256-bit APIC vector register (eight 32-bit words, 16 bytes apart)."""
    found = [w * 32 + b for w in range(8)
             for b in range(32) if int.from_bytes(lapic[base + 16 * w:base + 16 * w + 4], "little") >> b & 1]
    return "[" + ",".join(f"{v:#x}" for v in found) + "]"


class Machine:
    """A KVM virtual machine booting a Linux bzImage directly in 64-bit mode."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.layout = L.MemoryLayout(config.mem_mb << 20)
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemory([(gpa, size) for gpa, size, _ in self.layout.ram_ranges])
        self.io = IoBus()
        self.mmio = MmioBus()
        self.lock = threading.RLock()
        self.stats = ExitStats()
        self.msr_handler: MsrHandler | None = None
        # ports whose OUT handlers need the vCPU (its registers): the Hyper-V hypercall ports
        self.vcpu_io: dict[int, Callable[[Vcpu, int], None]] = {}
        self.extra_cpuid: list[abi.kvm_cpuid_entry2] = []
        self._stop = threading.Event()
        self._stop_reason: StopReason | None = None
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0
        self.vm.set_tss_addr(L.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(L.KVM_IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit()
        self.vm.set_memory(self.memory)

    # --- set-up ------------------------------------------------------------------------------------------

    def add_io_device(self, device: object) -> None:
        """Attach a port-I/O device model over its ``port_ranges``."""
        self.io.add(device)

    def add_mmio_device(self, start: int, length: int, device: object) -> None:
        self.mmio.register(start, length, device)

    def irq_line(self, irq: int, level: bool) -> None:
        self.vm.irq_line(irq, level)

    def pulse_irq(self, irq: int) -> None:
        self.vm.irq_line(irq, True)
        self.vm.irq_line(irq, False)

    def load(self, acpi_tables: bytes = b"") -> None:
        """Write kernel, initrd, boot params, page tables, GDT and ACPI into RAM; set up the vCPUs."""
        from hvlab.vmm.bootparams import prepare_boot

        kernel = Path(self.config.kernel).read_bytes()
        initrd = Path(self.config.initrd).read_bytes() if self.config.initrd else b""
        image = prepare_boot(kernel, self.layout, self.config.cmdline, initrd, acpi_tables)
        for gpa, blob in image.blobs:
            self.memory.write(gpa, blob)
        supported = self.kvm.supported_cpuid()
        for index in range(self.config.smp):
            vcpu = self.vm.create_vcpu(index)
            cpuid = guest_cpuid(supported, index, self.extra_cpuid)
            vcpu.set_cpuid(cpuid)
            vcpu.set_xcrs(guest_xcr0(cpuid))  # after SET_CPUID2: KVM checks XCR0 against leaf 0xD
            vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, **image.entry.msrs})
            fpu = abi.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
            vcpu.set_fpu(fpu)
            if index == 0:
                self._set_entry_state(vcpu, image.entry)

    @staticmethod
    def _set_entry_state(vcpu: Vcpu, entry) -> None:
        sregs = vcpu.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            setattr(sregs, name, abi.kvm_segment(**getattr(entry, name)))
        sregs.gdt = abi.kvm_dtable(base=entry.gdt[0], limit=entry.gdt[1])
        sregs.idt = abi.kvm_dtable(base=entry.idt[0], limit=entry.idt[1])
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
        vcpu.set_sregs(sregs)
        vcpu.set_regs(abi.kvm_regs(rip=entry.rip, rsi=entry.rsi, rsp=entry.rsp, rflags=entry.rflags))

    # --- running -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN with EINTR
        self.started_at = time.monotonic()
        for vcpu in self.vm.vcpus:
            t = threading.Thread(target=self._vcpu_loop, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
            vcpu.thread = t
            self._threads.append(t)
            t.start()

    def stop(self, reason: StopReason) -> None:
        """End the run (first reason wins) and kick every vCPU out of KVM_RUN."""
        with self.lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        self._stop.set()
        for vcpu in self.vm.vcpus:
            vcpu.run_struct.immediate_exit = 1
            t = vcpu.thread
            if t is not None and t.is_alive() and t is not threading.current_thread():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, TypeError):
                    pass

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the run ends (or ``timeout``); returns the reason, or None on timeout."""
        if not self._stop.wait(timeout):
            return None
        for t in self._threads:
            t.join(timeout=2)
        return self._stop_reason

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def vcpu_report(self, sample: bool = True) -> str:
        """Where each vCPU is and for how long: in the guest (with RIP, IF and the local APIC's
        pending and in-service vectors, sampled by kicking it out of KVM_RUN) or in a user-space exit
        handler (with that thread's Python stack).  For the error a dead-looking guest raises: it tells
        a guest stuck with interrupts off from a vCPU that stopped being woken from a host handler that
        blocked."""
        now = time.monotonic()
        lines = []
        for vcpu in self.vm.vcpus:
            where, since = vcpu.activity
            age = now - since if since else 0.0
            if where == "guest":
                line = f"vCPU {vcpu.index}: in KVM_RUN for {age:.1f} s"
                if sample and not self.stopped and vcpu.thread is not None and vcpu.thread.is_alive():
                    line += "; " + self._sample(vcpu)
            elif where == "idle":
                line = f"vCPU {vcpu.index}: not running"
            else:
                kind = _EXIT_KINDS.get(where, where)
                line = f"vCPU {vcpu.index}: handling a '{kind}' exit for {age:.1f} s"
                frame = sys._current_frames().get(vcpu.thread.ident) if vcpu.thread else None
                if frame is not None and age > 0.5:
                    line += "\n" + "".join(traceback.format_stack(frame)[-6:]).rstrip()
            lines.append(line)
        return "\n".join(lines)

    def _sample(self, vcpu: Vcpu) -> str:
        """Kick ``vcpu`` out of KVM_RUN; its thread records the registers and goes back in."""
        vcpu.sample = None
        vcpu.sample_request.set()
        vcpu.run_struct.immediate_exit = 1  # in case the signal lands between two KVM_RUNs
        try:
            signal.pthread_kill(vcpu.thread.ident, KICK_SIGNAL)
        except (ProcessLookupError, TypeError):
            return "thread gone"
        deadline = time.monotonic() + 1.0
        while vcpu.sample is None and time.monotonic() < deadline:
            time.sleep(0.01)
        vcpu.sample_request.clear()
        return vcpu.sample or "did not leave KVM_RUN within 1 s of a signal"

    def _cpu_state(self, vcpu: Vcpu, *, apic: bool) -> str:
        """Where the guest is: RIP, RSP, CR2 (the last page fault) and IF, plus with ``apic`` the local
        APIC's pending (IRR) and in-service (ISR) vectors and TPR and the guest's page-table walk of RIP
        (pagewalk.py); for hang reports and triple faults."""
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            lapic = vcpu.get_lapic() if apic else b""
        except KvmError as exc:
            return f"registers unreadable: {exc}"
        text = f"rip {regs.rip:#x} rsp {regs.rsp:#x} cr2 {sregs.cr2:#x} IF={(regs.rflags >> 9) & 1}"
        if apic:
            text += f" irr {_vectors(lapic, 0x200)} isr {_vectors(lapic, 0x100)} tpr {lapic[0x80]:#x}"
            if sregs.cr0 >> 31 & 1:  # paging on

                def read(gpa: int, length: int) -> bytes | None:
                    return self.memory.read(gpa, length) if self.memory.contains(gpa, length) else None

                text += "\n    " + pagewalk.describe(read, sregs.cr3, sregs.cr4, regs.rip)
        return text

    def _on_kick(self, vcpu: Vcpu) -> None:
        """KVM_RUN returned early (a signal or immediate_exit): record a requested sample and re-arm.
        stop() sets _stop before immediate_exit, so clearing it here cannot undo a stop."""
        if not self._stop.is_set():
            vcpu.run_struct.immediate_exit = 0
        if vcpu.sample_request.is_set() and vcpu.sample is None:
            vcpu.sample = self._cpu_state(vcpu, apic=True)

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        run = vcpu.run_struct
        stats = self.stats
        monotonic = time.monotonic
        try:
            while not self._stop.is_set():
                vcpu.activity = ("guest", monotonic())
                try:
                    reason = vcpu.run()
                except KvmError as exc:
                    if exc.errno in (errno.EINTR, errno.EAGAIN):
                        self._on_kick(vcpu)
                        continue
                    raise
                vcpu.activity = (reason, monotonic())  # named only when reported: this is per exit
                if reason == abi.KVM_EXIT_IO:
                    io = run.exit.io
                    stats.by_kind["io"] += 1
                    stats.by_port[io.port] += 1
                    data = vcpu.io_data()
                    size = io.size
                    with self.lock:
                        handler = self.vcpu_io.get(io.port)
                        if handler is not None and io.direction == abi.KVM_EXIT_IO_OUT:
                            handler(vcpu, int.from_bytes(data[:size], "little"))
                        elif io.direction == abi.KVM_EXIT_IO_OUT:
                            for i in range(io.count):
                                self.io.write(io.port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
                        else:
                            for i in range(io.count):
                                data[i * size:(i + 1) * size] = self.io.read(io.port, size).to_bytes(size, "little")
                elif reason == abi.KVM_EXIT_MMIO:
                    mmio = run.exit.mmio
                    stats.by_kind["mmio"] += 1
                    with self.lock:
                        if mmio.is_write:
                            self.mmio.write(mmio.phys_addr, mmio.len,
                                            int.from_bytes(bytes(mmio.data[:mmio.len]), "little"))
                        else:
                            value = self.mmio.read(mmio.phys_addr, mmio.len)
                            for i in range(mmio.len):
                                mmio.data[i] = (value >> (8 * i)) & 0xFF
                elif reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
                    self._msr_exit(vcpu, reason == abi.KVM_EXIT_X86_WRMSR)
                elif reason == abi.KVM_EXIT_INTR:
                    self._on_kick(vcpu)
                    continue
                elif reason == abi.KVM_EXIT_SHUTDOWN:
                    self.stop(StopReason("triple-fault", f"vCPU {vcpu.index} shut down (triple fault) "
                                                         f"at {self._cpu_state(vcpu, apic=False)}"))
                elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
                    kind = run.exit.system_event.type
                    if kind == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                        self.stop(StopReason("poweroff", "system event: shutdown"))
                    elif kind == abi.KVM_SYSTEM_EVENT_RESET:
                        self.stop(StopReason("reset", "system event: reset"))
                    else:
                        self.stop(StopReason("panic", f"system event {kind}"))
                elif reason == abi.KVM_EXIT_HLT:
                    stats.by_kind["hlt"] += 1
                    time.sleep(0.001)
                else:
                    name = abi.EXIT_NAMES.get(reason, str(reason))
                    detail = ""
                    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
                        detail = f" suberror {run.exit.internal.suberror}"
                    elif reason == abi.KVM_EXIT_FAIL_ENTRY:
                        detail = f" reason {run.exit.fail_entry.hardware_entry_failure_reason:#x}"
                    regs = vcpu.get_regs()
                    self.stop(StopReason("error", f"vCPU {vcpu.index}: unexpected '{name}' exit{detail} "
                                                  f"at rip {regs.rip:#x}"))
        except Exception as exc:  # a bug in a device must end the run visibly, not hang it
            self.stop(StopReason("error", f"vCPU {vcpu.index}: {type(exc).__name__}: {exc}"))
            raise
        finally:
            vcpu.activity = ("idle", monotonic())

    def _msr_exit(self, vcpu: Vcpu, write: bool) -> None:
        msr = vcpu.run_struct.exit.msr
        self.stats.by_kind["wrmsr" if write else "rdmsr"] += 1
        value = None
        if self.msr_handler is not None:
            with self.lock:
                value = self.msr_handler(vcpu, msr.index, write, msr.data)
        if value is None:
            msr.error = 1  # #GP, as real hardware does for an MSR it does not have
        else:
            msr.error = 0
            if not write:
                msr.data = value

    def close(self) -> None:
        if not self._stop.is_set():
            self.stop(StopReason("stopped", "closed"))
        for t in self._threads:
            t.join(timeout=2)
        self.vm.close()
        self.memory.close()
        self.kvm.close()

