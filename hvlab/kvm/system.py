"""KVM system, VM and vCPU objects over raw /dev/kvm ioctls.

All ioctls go through libc's ``ioctl`` via ctypes rather than ``fcntl.ioctl``: the latter takes integer
arguments as signed 32-bit values (KVM_SET_TSS_ADDR 0xfffbd000 fails) and holds the GIL, while a ctypes
call releases it, so vCPU threads can sit in KVM_RUN while the event loop runs.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import threading

from hvlab.errors import KvmUnusable
from hvlab.kvm import abi
from hvlab.kvm.memory import GuestMemory

_libc = C.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = C.c_int
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]


class KvmError(OSError):
    """An ioctl failed; the message names the ioctl."""


def ioctl(fd: int, request: int, arg: int | C.Structure | C.Array | None = None, name: str = "") -> int:
    """Issue an ioctl; ``arg`` is an integer (passed by value) or a ctypes object (passed by reference)."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = C.c_void_p(arg)
    else:
        ptr = C.cast(C.byref(arg), C.c_void_p)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        err = C.get_errno()
        raise KvmError(err, f"{name or hex(request)}: {os.strerror(err)}")
    return ret


class Kvm:
    """/dev/kvm: capability checks and VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise KvmUnusable(f"{path} does not exist (no KVM module loaded, or not passed to this machine)") from exc
        except PermissionError as exc:
            raise KvmUnusable(f"{path}: permission denied (run as root or join the kvm group)") from exc
        version = ioctl(self.fd, abi.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        if version != abi.KVM_API_VERSION:
            raise KvmUnusable(f"{path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        cpuid = abi.kvm_cpuid2(nent=abi.MAX_CPUID_ENTRIES)
        ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, name="KVM_GET_SUPPORTED_CPUID")
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, abi.KVM_CREATE_VM, 0, name="KVM_CREATE_VM"))

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A KVM VM: memory slots, in-kernel irqchip and PIT, interrupts, eventfds."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self._next_slot = 0
        self._routes: list[abi.kvm_irq_routing_entry] = []

    def _ioctl(self, request: int, arg=None, name: str = "") -> int:
        return ioctl(self.fd, request, arg, name=name)

    def set_memory(self, memory: GuestMemory, readonly: bool = False) -> None:
        """Register every RAM region of ``memory`` as a KVM memory slot."""
        for region in memory.regions:
            slot = abi.kvm_userspace_memory_region(
                slot=self._next_slot, flags=abi.KVM_MEM_READONLY if readonly else 0,
                guest_phys_addr=region.gpa, memory_size=region.size,
                userspace_addr=memory.host_address(region))
            self._ioctl(abi.KVM_SET_USER_MEMORY_REGION, slot, "KVM_SET_USER_MEMORY_REGION")
            self._next_slot += 1

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        self._ioctl(abi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = 0xFFFBC000) -> None:
        value = C.c_uint64(addr)
        self._ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and LAPICs: HLT and EOIs never reach user space."""
        self._ioctl(abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self._routes = self.default_routes()

    def create_pit(self) -> None:
        self._ioctl(abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        self._ioctl(abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq=irq, level=int(level)), "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI (e.g. address 0xFEE00000 | dest << 12, data = vector); returns >0 if delivered."""
        msi = abi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return self._ioctl(abi.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    @staticmethod
    def default_routes() -> list[abi.kvm_irq_routing_entry]:
        """The routes KVM installs with the irqchip (PIC pins 0-15, IOAPIC pins 0-23; GSI 2 is IOAPIC only).

        KVM_SET_GSI_ROUTING replaces the whole table, so adding an MSI route must re-add these or the PIT
        and serial interrupts stop.
        """
        routes = []
        for gsi in range(24):
            chips = [abi.KVM_IRQCHIP_IOAPIC]
            if gsi < 16 and gsi != 2:
                chips.insert(0, abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE)
            for chip in chips:
                e = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
                e.u.irqchip.irqchip = chip
                e.u.irqchip.pin = gsi % 8 if chip != abi.KVM_IRQCHIP_IOAPIC else gsi
                routes.append(e)
        return routes

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to an MSI (replacing any earlier route of that GSI), keeping the default routes."""
        self._routes = [r for r in self._routes if r.gsi != gsi]
        e = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_MSI)
        e.u.msi.address_lo = address & 0xFFFFFFFF
        e.u.msi.address_hi = address >> 32
        e.u.msi.data = data
        self._routes.append(e)
        self._commit_routes()

    def _commit_routes(self) -> None:
        table = abi.kvm_irq_routing(nr=len(self._routes))
        for i, r in enumerate(self._routes):
            table.entries[i] = r
        self._ioctl(abi.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Let a write to eventfd ``fd`` raise ``gsi`` inside the kernel (no user-space exit)."""
        arg = abi.kvm_irqfd(fd=fd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        self._ioctl(abi.KVM_IRQFD, arg, "KVM_IRQFD")

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        """Let a guest write to ``addr`` signal eventfd ``fd`` inside the kernel (no user-space exit)."""
        flags = (abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (abi.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        self._ioctl(abi.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def enable_cap(self, cap: int, *args: int) -> None:
        arg = abi.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            arg.args[i] = a
        self._ioctl(abi.KVM_ENABLE_CAP, arg, "KVM_ENABLE_CAP")

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], default_allow: bool = True) -> list:
        """Install an MSR filter: (base, nmsrs, flags, bitmap) per range; a 0 bit denies (-> user exit).

        Returns the bitmap buffers, which must stay alive while the filter is installed.
        """
        flt = abi.kvm_msr_filter(flags=abi.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else 1)
        keep = []
        for i, (base, nmsrs, flags, bitmap) in enumerate(ranges):
            buf = C.create_string_buffer(bytes(bitmap), len(bitmap))
            keep.append(buf)
            flt.ranges[i] = abi.kvm_msr_filter_range(flags=flags, nmsrs=nmsrs, base=base,
                                                     bitmap=C.cast(buf, C.c_void_p))
        self._ioctl(abi.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")
        return keep

    def create_vcpu(self, index: int | None = None) -> Vcpu:
        index = len(self.vcpus) if index is None else index
        vcpu = Vcpu(self, index, ioctl(self.fd, abi.KVM_CREATE_VCPU, index, name="KVM_CREATE_VCPU"))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        os.close(self.fd)


class Vcpu:
    """One vCPU: its kvm_run area, registers, CPUID and MSRs; ``run()`` enters the guest."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = abi.kvm_run.from_buffer(self._mm)
        self.run_buf = memoryview(self._mm)
        self.thread: threading.Thread | None = None
        self.activity: tuple[str | int, float] = ("idle", 0.0)
        """What the vCPU's thread is doing since when (monotonic): "guest" inside KVM_RUN, the
        exit reason (``abi.KVM_EXIT_*``) while user space handles it, "idle" before start and after."""
        self.sample_request = threading.Event()
        self.sample: str | None = None

    def _ioctl(self, request: int, arg=None, name: str = "") -> int:
        return ioctl(self.fd, request, arg, name=name)

    def get_lapic(self) -> bytes:
        """The in-kernel local APIC's 1 KiB register page (IRR at 0x200, ISR at 0x100, TPR at 0x80)."""
        state = abi.kvm_lapic_state()
        self._ioctl(abi.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytes(state.regs)

    def run(self) -> int:
        """Enter the guest until the next exit; returns the exit reason (``abi.KVM_EXIT_*``)."""
        self._ioctl(abi.KVM_RUN, 0, "KVM_RUN")
        return self.run_struct.exit_reason

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        self._ioctl(abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self._ioctl(abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        self._ioctl(abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self._ioctl(abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self._ioctl(abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        cpuid = abi.kvm_cpuid2(nent=len(entries))
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        self._ioctl(abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        """The vCPU's CPUID as KVM answers it now, with the fields KVM keeps up to date (0xD.0 EBX, OSXSAVE)."""
        cpuid = abi.kvm_cpuid2(nent=abi.MAX_CPUID_ENTRIES)
        self._ioctl(abi.KVM_GET_CPUID2, cpuid, "KVM_GET_CPUID2")
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def get_xcr0(self) -> int:
        xcrs = abi.kvm_xcrs()
        self._ioctl(abi.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return next((x.value for x in xcrs.xcrs[:xcrs.nr_xcrs] if x.xcr == 0), 1)

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = abi.kvm_msrs(nmsrs=len(values))
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i] = abi.kvm_msr_entry(index=index, data=data)
        n = self._ioctl(abi.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(0, f"KVM_SET_MSRS: MSR {bad:#x} refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = abi.kvm_msrs(nmsrs=len(indices))
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        n = self._ioctl(abi.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_xcrs(self, xcr0: int) -> None:
        xcrs = abi.kvm_xcrs(nr_xcrs=1)
        xcrs.xcrs[0] = abi.kvm_xcr(xcr=0, value=xcr0)
        self._ioctl(abi.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def tsc_khz(self) -> int:
        return self._ioctl(abi.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def io_data(self) -> memoryview:
        """The data bytes of the current KVM_EXIT_IO (size * count bytes inside the kvm_run mapping)."""
        io = self.run_struct.exit.io
        return self.run_buf[io.data_offset:io.data_offset + io.size * io.count]

    def close(self) -> None:
        del self.run_struct
        self.run_buf.release()
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self.fd)
