"""End to end: real Debian kernels boot under hvlab's VMM and answer through the agent."""

import time

import pytest

KERNELS = [
    "6.1",
    "6.12",
    pytest.param("7.3", marks=pytest.mark.xfail(
        strict=True,
        reason="known bug: 7.3 warns 'XSAVE consistency problem: size 832 != kernel_size 576' with KVM's leaf "
               "0xD in L1 (XCR0 0x7), disables XSAVE and oopses in fpstate_reset; 6.1 and 6.12 accept the same CPUID")),
]

pytestmark = pytest.mark.kvm

# Known issue: under the nested runner (KVM inside QEMU TCG) a guest occasionally dies early on its second
# vCPU ("ENTRY_TRAMPOLINE stack guard page was hit", seen once in 4 sessions with 6.1).  Boots are retried
# only when the guest panics; any other failure, or two panics in a row, fails the test.
flaky_nested_panic = pytest.mark.flaky(reruns=1, only_rerun=["GuestPanic"])


@flaky_nested_panic
@pytest.mark.parametrize("label", KERNELS)
def test_boot_runs_command(hvlab_guest, label):
    vm = hvlab_guest(label, smp=2)
    r = vm.run("uname -r; nproc", timeout=30)
    assert r.returncode == 0, r.stderr
    release, ncpu = r.stdout.split()
    assert release == vm.config.kernel.release
    assert ncpu == "2"


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
