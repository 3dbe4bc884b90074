"""The KVM ABI structures must match the kernel's layout byte for byte."""

import ctypes as C
import shutil
import subprocess
from pathlib import Path

import pytest

from hvlab.kvm import abi, probe


@pytest.mark.parametrize("struct,size", [
    (abi.kvm_regs, 144), (abi.kvm_sregs, 312), (abi.kvm_segment, 24), (abi.kvm_dtable, 16),
    (abi.kvm_fpu, 416), (abi.kvm_msr_filter, 392), (abi.kvm_enable_cap, 104), (abi.kvm_vcpu_events, 64),
    (abi.kvm_ioeventfd, 64), (abi.kvm_irqfd, 32), (abi.kvm_msi, 32), (abi.kvm_irq_routing_entry, 48),
    (abi.kvm_userspace_memory_region, 32), (abi.kvm_cpuid_entry2, 40), (abi.kvm_xcrs, 392),
    (abi.kvm_pit_config, 64), (abi.kvm_msr_entry, 16),
])
def test_struct_sizes(struct, size):
    assert C.sizeof(struct) == size


def test_kvm_run_offsets():
    assert abi.kvm_run.exit_reason.offset == 8
    assert abi.kvm_run.exit.offset == 32
    assert abi.kvm_run.kvm_valid_regs.offset == 288
    assert abi.kvm_run.s.offset == 304
    assert abi.kvm_run_msr.index.offset == 12 and abi.kvm_run_msr.data.offset == 16


def test_ioctl_numbers_match_linux():
    # values from linux/kvm.h as compiled on x86-64
    assert abi.KVM_CREATE_VM == 0xAE01
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_GET_SREGS == 0x8138AE83
    assert abi.KVM_SET_CPUID2 == 0x4008AE90
    assert abi.KVM_ENABLE_CAP == 0x4068AEA3
    assert abi.KVM_GET_TSC_KHZ == 0xAEA3
    assert abi.KVM_X86_SET_MSR_FILTER == 0x4188AEC6
    assert abi.KVM_IOEVENTFD == 0x4040AE79
    assert abi.KVM_SIGNAL_MSI == 0x4020AEA5


def test_default_routes_cover_pic_and_ioapic():
    from hvlab.kvm.system import Vm

    routes = Vm.default_routes()
    by_gsi = {}
    for r in routes:
        by_gsi.setdefault(r.gsi, []).append((r.u.irqchip.irqchip, r.u.irqchip.pin))
    assert by_gsi[0] == [(abi.KVM_IRQCHIP_PIC_MASTER, 0), (abi.KVM_IRQCHIP_IOAPIC, 0)]
    assert by_gsi[2] == [(abi.KVM_IRQCHIP_IOAPIC, 2)]
    assert by_gsi[9] == [(abi.KVM_IRQCHIP_PIC_SLAVE, 1), (abi.KVM_IRQCHIP_IOAPIC, 9)]
    assert by_gsi[23] == [(abi.KVM_IRQCHIP_IOAPIC, 23)]


@pytest.mark.skipif(not shutil.which("as") or not shutil.which("objcopy"), reason="binutils not installed")
def test_probe_bytes_match_source(tmp_path):
    src = Path(probe.__file__).with_name("probe.S")
    subprocess.run(["as", str(src), "-o", str(tmp_path / "p.o")], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(tmp_path / "p.o"), str(tmp_path / "p.bin")], check=True)
    assert (tmp_path / "p.bin").read_bytes() == probe.CODE
    nm = subprocess.run(["nm", str(tmp_path / "p.o")], capture_output=True, text=True, check=True).stdout
    assert f"{probe.HANDLER_OFFSET:016x} T handler" in nm


def test_guest_memory_bounds():
    from hvlab.kvm.memory import GuestMemory

    mem = GuestMemory([(0, 1 << 20), (1 << 32, 1 << 20)])
    mem.write(0x1000, b"abc")
    assert mem.read(0x1000, 3) == b"abc"
    mem.write((1 << 32) + 10, b"x")
    assert mem.read((1 << 32) + 10, 1) == b"x"
    assert not mem.contains((1 << 20) - 1, 2)  # straddles the end of RAM
    with pytest.raises(ValueError):
        mem.view_at(0xFFFFF, 2)
    mem.close()
