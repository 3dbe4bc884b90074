"""End to end: the real hv_vmbus and hv_utils drivers against hvlab's Hyper-V platform and VMBus server.

One boot per kernel checks the whole chain: Hyper-V detected, VMBus negotiated, the offered services
bound with the class ids the host offered, the heartbeat sequence advancing, TimeSync stepping the
guest clock, and the run ending through the Shutdown service (not the agent).
"""

import time

import pytest

from hvlab.pytest_plugin import KERNELS, retry_on_guest_fault

pytestmark = pytest.mark.kvm


@retry_on_guest_fault
@pytest.mark.parametrize("label", KERNELS)
def test_vmbus_services_heartbeat_and_shutdown(hvlab_guest, label):
    vm = hvlab_guest(label, smp=2)
    r = vm.run("dmesg; echo @@; for d in /sys/bus/vmbus/devices/*; do "
               "echo $(cat $d/class_id) $(cat $d/device_id) $(basename $(readlink $d/driver)); done", timeout=30)
    assert r.returncode == 0, r.stderr
    dmesg, devices = r.stdout.split("@@\n")
    assert "Hypervisor detected: Microsoft Hyper-V" in dmesg
    assert f"hv_vmbus: Vmbus version:{vm.vmbus.snapshot()['version']}" in dmesg
    assert "Heartbeat IC version 3.0" in dmesg
    assert "Shutdown IC version 3.2" in dmesg
    assert "TimeSync IC version 4.0" in dmesg

    # The guest's view of the bus matches what the host offered: hv_utils drives the services, hv_netvsc the NIC.
    seen = {tuple(line.split()) for line in devices.splitlines() if line.strip()}
    offered = {(f"{{{d.class_guid}}}", f"{{{d.instance_guid}}}", "hv_utils")
               for d in (vm.heartbeat, vm.shutdown_ic, vm.timesync)}
    offered |= {(f"{{{d.class_guid}}}", f"{{{d.instance_guid}}}", "hv_netvsc") for d in vm.net.nics}
    assert seen == offered

    # The heartbeat sequence advances: at least 3 good answers in 5 s (interval 1 s).
    before = vm.heartbeat.beats
    time.sleep(5)
    new = list(vm.heartbeat.history)[before:]
    assert len(new) >= 3, f"only {len(new)} heartbeats in 5 s"
    assert all(rec.ok for rec in new)
    assert [rec.sent for rec in new] == sorted({rec.sent for rec in new})

    # TimeSync steps the guest clock to the host's: shift the host clock by a day and sync.
    vm.timesync.wall_clock = lambda: time.time() + 86400
    assert vm.timesync.sync_now()
    deadline = time.monotonic() + 10
    while True:
        skew = int(vm.run("date +%s", timeout=10).stdout) - (time.time() + 86400)
        if abs(skew) < 5 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert abs(skew) < 5, f"guest clock is {skew:.0f} s off the host's shifted clock"
    assert vm.timesync.samples_acked >= 2

    # The run ends through the Shutdown service: hv_utils -> orderly_poweroff -> ACPI S5.
    reason = vm.shutdown(timeout=20)
    assert reason.kind == "poweroff", reason
    assert vm.shutdown_path == "shutdown-ic"
    assert [res.accepted for res in vm.shutdown_ic.results] == [True]
    assert vm.vmbus.violation_count == 0, vm.vmbus.violations
    # Channel doorbells completed in the kernel (ioeventfd), not through the slow hypercall path.
    assert vm.hyperv.doorbells.signals > 0
