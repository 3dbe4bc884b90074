"""The KVM user-space ABI (linux/kvm.h, x86-64): ioctl numbers, constants and ctypes structures.

Declared once here; sizes are checked by unit tests against the values the kernel headers give
(e.g. kvm_sregs 312, kvm_msr_filter 392, kvm_enable_cap 104, kvm_vcpu_events 64).
"""

from __future__ import annotations

import ctypes as C

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(struct))


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(struct))


# --- structures -----------------------------------------------------------------------------------------

class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
                ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64)]


class kvm_regs(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16),
                ("type", C.c_uint8), ("present", C.c_uint8), ("dpl", C.c_uint8), ("db", C.c_uint8),
                ("s", C.c_uint8), ("l", C.c_uint8), ("g", C.c_uint8), ("avl", C.c_uint8),
                ("unusable", C.c_uint8), ("padding", C.c_uint8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64), ("cr4", C.c_uint64),
                ("cr8", C.c_uint64), ("efer", C.c_uint64), ("apic_base", C.c_uint64),
                ("interrupt_bitmap", C.c_uint64 * 4)]


class kvm_fpu(C.Structure):
    _fields_ = [("fpr", C.c_uint8 * 128), ("fcw", C.c_uint16), ("fsw", C.c_uint16), ("ftwx", C.c_uint8),
                ("pad1", C.c_uint8), ("last_opcode", C.c_uint16), ("last_ip", C.c_uint64),
                ("last_dp", C.c_uint64), ("xmm", C.c_uint8 * 256), ("mxcsr", C.c_uint32),
                ("pad2", C.c_uint32)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32),
                ("eax", C.c_uint32), ("ebx", C.c_uint32), ("ecx", C.c_uint32), ("edx", C.c_uint32),
                ("padding", C.c_uint32 * 3)]


MAX_CPUID_ENTRIES = 256


class kvm_cpuid2(C.Structure):
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32),
                ("entries", kvm_cpuid_entry2 * MAX_CPUID_ENTRIES)]


class _kvm_cpuid2_hdr(C.Structure):  # the size the ioctl number encodes
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


MAX_MSR_ENTRIES = 64


class kvm_msrs(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", kvm_msr_entry * MAX_MSR_ENTRIES)]


class _kvm_msrs_hdr(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", C.c_uint32), ("level", C.c_uint32)]


class kvm_irqfd(C.Structure):
    _fields_ = [("fd", C.c_uint32), ("gsi", C.c_uint32), ("flags", C.c_uint32), ("resamplefd", C.c_uint32),
                ("pad", C.c_uint8 * 16)]


class kvm_ioeventfd(C.Structure):
    _fields_ = [("datamatch", C.c_uint64), ("addr", C.c_uint64), ("len", C.c_uint32), ("fd", C.c_int32),
                ("flags", C.c_uint32), ("pad", C.c_uint8 * 36)]


class kvm_msi(C.Structure):
    _fields_ = [("address_lo", C.c_uint32), ("address_hi", C.c_uint32), ("data", C.c_uint32),
                ("flags", C.c_uint32), ("devid", C.c_uint32), ("pad", C.c_uint8 * 12)]


class kvm_irq_routing_irqchip(C.Structure):
    _fields_ = [("irqchip", C.c_uint32), ("pin", C.c_uint32)]


class kvm_irq_routing_msi(C.Structure):
    _fields_ = [("address_lo", C.c_uint32), ("address_hi", C.c_uint32), ("data", C.c_uint32),
                ("devid", C.c_uint32)]


class _routing_u(C.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", C.c_uint32 * 8)]


class kvm_irq_routing_entry(C.Structure):
    _fields_ = [("gsi", C.c_uint32), ("type", C.c_uint32), ("flags", C.c_uint32), ("pad", C.c_uint32),
                ("u", _routing_u)]


MAX_ROUTES = 1024


class kvm_irq_routing(C.Structure):
    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32), ("entries", kvm_irq_routing_entry * MAX_ROUTES)]


class _kvm_irq_routing_hdr(C.Structure):
    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32)]


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32 * 15)]


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4), ("pad", C.c_uint8 * 64)]


class kvm_msr_filter_range(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("nmsrs", C.c_uint32), ("base", C.c_uint32),
                ("bitmap", C.c_void_p)]


class kvm_msr_filter(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("ranges", kvm_msr_filter_range * 16)]


class kvm_vcpu_events(C.Structure):
    _fields_ = [("raw", C.c_uint8 * 64)]


class kvm_xcr(C.Structure):
    _fields_ = [("xcr", C.c_uint32), ("reserved", C.c_uint32), ("value", C.c_uint64)]


class kvm_xcrs(C.Structure):
    _fields_ = [("nr_xcrs", C.c_uint32), ("flags", C.c_uint32), ("xcrs", kvm_xcr * 16),
                ("padding", C.c_uint64 * 16)]


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_uint8 * 1024)]


class kvm_sync_regs(C.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


# kvm_run: the fixed head, the exit union at offset 32 (256 bytes), then the sync-regs area.
class kvm_run_io(C.Structure):
    _fields_ = [("direction", C.c_uint8), ("size", C.c_uint8), ("port", C.c_uint16), ("count", C.c_uint32),
                ("data_offset", C.c_uint64)]


class kvm_run_mmio(C.Structure):
    _fields_ = [("phys_addr", C.c_uint64), ("data", C.c_uint8 * 8), ("len", C.c_uint32),
                ("is_write", C.c_uint8)]


class kvm_run_msr(C.Structure):
    _fields_ = [("error", C.c_uint8), ("pad", C.c_uint8 * 7), ("reason", C.c_uint32), ("index", C.c_uint32),
                ("data", C.c_uint64)]


class kvm_run_internal(C.Structure):
    _fields_ = [("suberror", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class kvm_run_system_event(C.Structure):
    _fields_ = [("type", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class kvm_run_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", C.c_uint64), ("cpu", C.c_uint32)]


class kvm_run_exception(C.Structure):
    _fields_ = [("exception", C.c_uint32), ("error_code", C.c_uint32)]


class _kvm_run_exit(C.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("msr", kvm_run_msr),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
                ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_exception), ("padding", C.c_uint8 * 256)]


class _kvm_run_s(C.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", C.c_uint8 * 2048)]


class kvm_run(C.Structure):
    _fields_ = [("request_interrupt_window", C.c_uint8), ("immediate_exit", C.c_uint8),
                ("padding1", C.c_uint8 * 6), ("exit_reason", C.c_uint32),
                ("ready_for_interrupt_injection", C.c_uint8), ("if_flag", C.c_uint8), ("flags", C.c_uint16),
                ("cr8", C.c_uint64), ("apic_base", C.c_uint64), ("exit", _kvm_run_exit),
                ("kvm_valid_regs", C.c_uint64), ("kvm_dirty_regs", C.c_uint64), ("s", _kvm_run_s)]


# --- ioctl numbers --------------------------------------------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _kvm_cpuid2_hdr)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _ioc(_IOC_WRITE, 0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, _kvm_irq_routing_hdr)
KVM_IRQFD = _iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, _kvm_msrs_hdr)
KVM_SET_MSRS = _iow(0x89, _kvm_msrs_hdr)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, _kvm_cpuid2_hdr)
KVM_GET_CPUID2 = _iowr(0x91, _kvm_cpuid2_hdr)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)  # shares nr 0xa3 with KVM_ENABLE_CAP (different direction)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_SIGNAL_MSI = _iow(0xA5, kvm_msi)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, kvm_msr_filter)

# --- constants ------------------------------------------------------------------------------------------

KVM_API_VERSION = 12

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_HYPERV = 44
KVM_CAP_SYNC_REGS = 74
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in globals().items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_SYNC_X86_REGS = 1
KVM_SYNC_X86_SREGS = 2
KVM_SYNC_X86_EVENTS = 4

KVM_MEM_READONLY = 2

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQFD_FLAG_DEASSIGN = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1
KVM_IOEVENTFD_FLAG_PIO = 2
KVM_IOEVENTFD_FLAG_DEASSIGN = 4

KVM_PIT_SPEAKER_DUMMY = 1

KVM_MSR_EXIT_REASON_INVAL = 1
KVM_MSR_EXIT_REASON_UNKNOWN = 2
KVM_MSR_EXIT_REASON_FILTER = 4
KVM_MSR_FILTER_READ = 1
KVM_MSR_FILTER_WRITE = 2
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
