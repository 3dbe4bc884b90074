"""End to end: real Debian kernels boot under hvlab's VMM and answer through the agent."""

import re
import time

import pytest

from hvlab.pytest_plugin import KERNELS, retry_on_guest_fault

pytestmark = pytest.mark.kvm


@retry_on_guest_fault
@pytest.mark.parametrize("label", KERNELS)
def test_boot_runs_command(hvlab_guest, label):
    vm = hvlab_guest(label, smp=2)
    r = vm.run("uname -r; nproc", timeout=30)
    assert r.returncode == 0, r.stderr
    release, ncpu = r.stdout.split()
    assert release == vm.config.kernel.release
    assert ncpu == "2"
    # XSAVE stays on: the guest's sum of the 0xD sub-leaves matches 0xD.0 EBX (see hvlab.vmm.cpuid.guest_xcr0)
    r = vm.run("dmesg | grep -c 'XSAVE consistency problem'; grep -cw xsave /proc/cpuinfo", timeout=30)
    warnings, cpus_with_xsave = r.stdout.split()
    assert warnings == "0", "the guest disabled XSAVE"
    assert cpus_with_xsave == "2"
    # The hang diagnosis can see inside a live guest without disturbing it: a vCPU in KVM_RUN is kicked
    # out and reports its RIP, local APIC state and the guest's own page-table walk of that RIP down to
    # the code bytes (executable, so no NX on the way); one in a user-space exit handler says which.
    report = vm.machine.vcpu_report()
    blocks = re.split(r"\n(?=vCPU \d+:)", report)
    assert [b.split(":")[0] for b in blocks] == ["vCPU 0", "vCPU 1"], report
    in_guest = [b for b in blocks if "in KVM_RUN" in b.splitlines()[0]]
    assert in_guest, report  # the guest is idle: at least one vCPU is in it
    for block in in_guest:
        first, walk = block.splitlines()[0], block.splitlines()[-1].strip()
        assert " rip 0x" in first and " irr [" in first, report
        assert walk.startswith("walk of 0x") and "-> gpa 0x" in walk and "NX" not in walk, report
    assert all("in KVM_RUN" in b or "exit for" in b for b in blocks), report
    assert vm.run("true", timeout=30).returncode == 0


def test_kvm_xsave_size_follows_the_starting_xcr0():
    """KVM's CPUID 0xD.0 EBX is the XSAVE size of the XCR0 KVM knows; it must be the size of what Linux enables."""
    from hvlab.kvm.system import Kvm
    from hvlab.vmm.cpuid import LEAF_XSTATE, guest_cpuid, guest_xcr0

    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        cpuid = guest_cpuid(kvm.supported_cpuid(), 0)
        vcpu.set_cpuid(cpuid)
        xcr0 = guest_xcr0(cpuid)
        vcpu.set_xcrs(xcr0)
        assert vcpu.get_xcr0() == xcr0
        leaves = {(e.function, e.index): e for e in vcpu.get_cpuid()}
        expected = 576  # legacy area + XSAVE header
        for bit in range(2, 64):
            if xcr0 >> bit & 1:
                sub = leaves[(LEAF_XSTATE, bit)]
                expected = max(expected, sub.ebx + sub.eax)  # offset + size, standard format
        assert leaves[(LEAF_XSTATE, 0)].ebx == expected
    finally:
        vm.close()
        kvm.close()


def test_poweroff_ends_vm_quickly(hvlab_guest):
    vm = hvlab_guest("6.12", smp=1)
    vm.agent.fire("poweroff -f")
    t0 = time.monotonic()
    reason = vm.machine.wait(10)
    elapsed = time.monotonic() - t0
    assert reason is not None and reason.kind == "poweroff", reason
    assert elapsed < 1.0, f"power-off took {elapsed:.2f} s"


def test_panic_ends_vm_with_panic_text(hvlab_guest):
    from hvlab.errors import GuestError

    vm = hvlab_guest("6.12", smp=1)
    vm.agent.fire("echo c > /proc/sysrq-trigger")
    assert vm.machine.wait(30) is not None
    reason = vm.stop_reason()
    assert reason.kind == "panic", reason
    assert "sysrq" in reason.detail.lower() or "Kernel panic" in reason.detail
    log = (vm.run_dir / "console.log").read_text(errors="replace")
    assert "Kernel panic - not syncing" in log
    with pytest.raises(GuestError):
        vm.run("true", timeout=5)
