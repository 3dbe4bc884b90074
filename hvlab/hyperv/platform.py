"""Ties the Hyper-V pieces into a Machine: CPUID leaves, the MSR filter, the hypercall ports, the SynIC.

Synthetic MSRs are routed to user space with KVM_X86_SET_MSR_FILTER (all of 0x40000000-0x400001FF
denied, so every access exits with reason FILTER) rather than relying on "unknown MSR" exits: a host
kernel built with CONFIG_KVM_HYPERV=y would otherwise handle them itself and rewrite our hypercall page.
VMBus plugs in through ``post_message`` / ``signal_event`` handlers and the ``SynicPort`` adapter; it
never sees KVM.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from hvlab.hyperv import hypercall as hc
from hvlab.hyperv import msrs
from hvlab.hyperv.cpuid import hyperv_leaves
from hvlab.hyperv.synic import Synic
from hvlab.kvm import abi
from hvlab.kvm.system import Vcpu

log = logging.getLogger("hvlab.hyperv")

VMBUS_SINT = 2
APIC_FREQUENCY_HZ = 1_000_000_000  # KVM's in-kernel LAPIC timer ticks at 1 GHz

PostHandler = Callable[[int, int, int, bytes], int]
SignalHandler = Callable[[int], int]


class SynicPort:
    """What the VMBus server sees of the SynIC: channel messages into SINT2, event flags by relid."""

    def __init__(self, synic: Synic) -> None:
        self.synic = synic

    def post(self, vp: int, sint: int, payload: bytes) -> bool:
        from hvlab.protocol.vmbus import build_hv_message

        return self.synic.post(vp, sint, build_hv_message(payload))

    def signal_event(self, vp: int, relid: int) -> None:
        self.synic.signal_event(vp, VMBUS_SINT, relid)


class HypervPlatform:
    """The emulated Hyper-V of one Machine.  Create it before ``machine.load()`` (CPUID is per vCPU)."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.synic = Synic(machine.config.smp, machine.memory, inject=self._inject)
        self.port = SynicPort(self.synic)
        self.guest_os_id = 0
        self.hypercall_msr = 0
        self.tsc_hz = 0
        self.crash = [0] * 6
        self.post_message: PostHandler = lambda vp, conn, mtype, payload: hc.HV_STATUS_INVALID_CONNECTION_ID
        self.signal_event: SignalHandler = lambda conn: hc.HV_STATUS_INVALID_CONNECTION_ID
        self.stats = {"hypercalls": 0, "msr": 0}
        self.t0 = time.monotonic_ns()
        machine.extra_cpuid = hyperv_leaves()
        machine.msr_handler = self.msr
        machine.vcpu_io[hc.SLOW_PORT] = self._slow_hypercall
        machine.vcpu_io[hc.FAST_PORT] = self._unmatched_signal
        machine.vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
        self._filter = machine.vm.set_msr_filter(
            [(msrs.FILTER_BASE, msrs.FILTER_COUNT, abi.KVM_MSR_FILTER_READ | abi.KVM_MSR_FILTER_WRITE,
              bytes(msrs.FILTER_COUNT // 8))])

    def reference_counter(self) -> int:
        """The partition reference counter: 100-ns units since the platform started (TIME_REF_COUNT)."""
        return (time.monotonic_ns() - self.t0) // 100

    def attach_vmbus(self, server) -> None:
        """Route HvPostMessage, HvSignalEvent and EOM to a VMBus server and give each of its channels a
        doorbell (an ioeventfd on the fast-signal port, so channel signals complete in the kernel).

        ``server`` is duck-typed (hvlab.vmbus.server.VmbusServer): ``handle_post_message``,
        ``handle_signal_event``, ``on_eom`` and ``on_channels_changed``; the platform knows no VMBus
        message. The server's lock must be the machine lock (hypercalls arrive holding it)."""
        from hvlab.hyperv.doorbells import Doorbells

        self.post_message = server.handle_post_message
        self.signal_event = server.handle_signal_event
        self.synic.on_eom = server.on_eom
        self.doorbells = Doorbells(self.machine.vm, server.handle_signal_event)
        server.on_channels_changed = lambda ids: self.doorbells.update(ids.values())
        self.doorbells.update(server.channel_connection_ids().values())

    def close(self) -> None:
        """Stop the doorbell thread (before the VM's fd closes)."""
        doorbells = getattr(self, "doorbells", None)
        if doorbells is not None:
            doorbells.close()

    def _inject(self, vp: int, vector: int) -> None:
        self.machine.vm.signal_msi(0xFEE00000 | (vp << 12), vector)

    # MSRs ------------------------------------------------------------------------------------------------

    def msr(self, vcpu: Vcpu, index: int, write: bool, value: int) -> int | None:
        """Answer a synthetic MSR access; None means #GP (an MSR real Hyper-V would not have)."""
        self.stats["msr"] += 1
        if write:
            return 0 if self._write(vcpu, index, value) else None
        return self._read(vcpu, index)

    def _read(self, vcpu: Vcpu, index: int) -> int | None:
        if index == msrs.GUEST_OS_ID:
            return self.guest_os_id
        if index == msrs.HYPERCALL:
            return self.hypercall_msr
        if index == msrs.VP_INDEX:
            return vcpu.index
        if index == msrs.TSC_FREQUENCY:
            if not self.tsc_hz:
                self.tsc_hz = vcpu.tsc_khz() * 1000
            return self.tsc_hz
        if index == msrs.APIC_FREQUENCY:
            return APIC_FREQUENCY_HZ
        if index == msrs.TIME_REF_COUNT:
            return self.reference_counter()
        if index == msrs.VP_ASSIST_PAGE:
            return 0
        if index == msrs.TSC_INVARIANT_CONTROL:
            return 1
        if msrs.CRASH_P0 <= index <= msrs.CRASH_CTL:
            return self.crash[index - msrs.CRASH_P0]
        return self.synic.read_msr(vcpu.index, index)

    def _write(self, vcpu: Vcpu, index: int, value: int) -> bool:
        if index == msrs.GUEST_OS_ID:
            self.guest_os_id = value
            return True
        if index == msrs.HYPERCALL:
            self.hypercall_msr = value
            if value & 1:
                gpa = value & ~0xFFF
                if not self.machine.memory.contains(gpa, 4096):
                    log.warning("hypercall page outside RAM: %#x", gpa)
                    return False
                self.machine.memory.write(gpa, hc.STUB)
            return True
        if index in (msrs.VP_ASSIST_PAGE, msrs.TSC_INVARIANT_CONTROL, msrs.REFERENCE_TSC):
            return True
        if msrs.CRASH_P0 <= index <= msrs.CRASH_CTL:
            self.crash[index - msrs.CRASH_P0] = value
            return True
        return self.synic.write_msr(vcpu.index, index, value)

    # hypercalls ------------------------------------------------------------------------------------------

    def _slow_hypercall(self, vcpu: Vcpu, value: int) -> None:
        self.stats["hypercalls"] += 1
        regs = vcpu.get_regs()
        ctl = hc.Control.decode(regs.rcx)
        status = self._dispatch(vcpu, ctl, regs.rdx, regs.r8)
        regs.rax = status
        vcpu.set_regs(regs)

    def _dispatch(self, vcpu: Vcpu, ctl: hc.Control, rdx: int, r8: int) -> int:
        if ctl.code == hc.HVCALL_POST_MESSAGE:
            if ctl.fast:
                return hc.HV_STATUS_INVALID_HYPERCALL_INPUT
            if rdx % 8 or not self.machine.memory.contains(rdx, hc.POST_MESSAGE_INPUT_SIZE):
                return hc.HV_STATUS_INVALID_ALIGNMENT if rdx % 8 else hc.HV_STATUS_INVALID_PARAMETER
            data = self.machine.memory.read(rdx, hc.POST_MESSAGE_INPUT_SIZE)
            conn, _, mtype, size = struct.unpack_from("<IIII", data)
            if size > hc.POST_MESSAGE_MAX_PAYLOAD:
                return hc.HV_STATUS_INVALID_PARAMETER
            return self.post_message(vcpu.index, conn & 0xFFFFFF, mtype, data[16:16 + size])
        if ctl.code == hc.HVCALL_SIGNAL_EVENT:
            if ctl.fast:
                conn = rdx & 0xFFFFFFFF
            elif self.machine.memory.contains(rdx, 8):
                conn = struct.unpack("<I", self.machine.memory.read(rdx, 4))[0]
            else:
                return hc.HV_STATUS_INVALID_PARAMETER
            return self.signal_event(conn)
        if ctl.code == hc.HVCALL_RETARGET_INTERRUPT:
            return hc.HV_STATUS_SUCCESS  # interrupts stay where pci-hyperv's MSI message points
        return hc.HV_STATUS_INVALID_HYPERCALL_CODE

    def _unmatched_signal(self, vcpu: Vcpu, value: int) -> None:
        """A fast HvSignalEvent whose connection id has no ioeventfd: handle it here (RAX is already 0)."""
        self.stats["hypercalls"] += 1
        self.signal_event(value & 0xFFFFFFFF)
