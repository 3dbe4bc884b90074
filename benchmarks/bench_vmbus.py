"""VMBus costs with a real guest: ring-packet round trips and channel-message round trips, with exits.

Run where KVM works (natively, or inside the nested runner):
    hvlab exec --rw benchmarks/results -- python3 benchmarks/bench_vmbus.py \
        --out benchmarks/results/vmbus-<machine>.json

Ring path: the host sends Heartbeat requests back to back (the next one when the answer arrives), so
every round trip is: host ring write + interrupt (KVM_SIGNAL_MSI) -> hv_utils answers in the guest ->
guest ring write + fast HvSignalEvent (ioeventfd, no exit) -> the doorbell thread drains the ring. We
report round trips per second, packets per second (two per round trip) and user-space exits per packet.

Message path: the guest moves a channel to the other vCPU through sysfs, which sends MODIFYCHANNEL
(HvPostMessage, a slow hypercall that exits) and, on VMBus >= 5.3, waits for MODIFYCHANNEL_RESPONSE
(a SynIC message + EOM). The guest's loop time per move, minus the same loop without the write, is
the message round trip.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ring_round_trips(vm, count: int) -> dict:
    from hvlab.protocol import ic

    hb = vm.heartbeat
    done = threading.Event()
    times: list[float] = []
    state = {"seq": 10_000_000}

    def send() -> None:
        state["seq"] += 1
        times.append(time.monotonic())
        if not hb.send_request(ic.ICMSGTYPE_HEARTBEAT, ic.build_heartbeat(state["seq"]), on_reply):
            done.set()

    def on_reply(msg) -> None:
        if len(times) >= count:
            times.append(time.monotonic())
            done.set()
        else:
            send()

    stats = vm.machine.stats
    exits0, bells0, events0 = stats.total(), vm.hyperv.doorbells.signals, vm.hyperv.synic.stats["events"]
    calls0 = vm.hyperv.stats["hypercalls"]
    with vm.machine.lock:
        send()
    if not done.wait(120):
        raise SystemExit(f"ring benchmark stalled after {len(times)} round trips")
    elapsed = times[-1] - times[0]
    n = len(times) - 1
    exits = stats.total() - exits0
    return {
        "round_trips": n,
        "seconds": round(elapsed, 3),
        "round_trip_us": round(elapsed / n * 1e6, 1),
        "round_trips_per_s": round(n / elapsed, 1),
        "packets_per_s": round(2 * n / elapsed, 1),
        "user_space_exits": exits,
        "exits_per_packet": round(exits / (2 * n), 3),
        "slow_hypercalls": vm.hyperv.stats["hypercalls"] - calls0,
        "doorbell_reads": vm.hyperv.doorbells.signals - bells0,
        "host_to_guest_interrupts": vm.hyperv.synic.stats["events"] - events0,
    }


def message_round_trips(vm, count: int) -> dict:
    relid = vm.heartbeat.channel.relid
    sysfs = f"/sys/bus/vmbus/devices/{vm.heartbeat.instance_guid}/channels/{relid}/cpu"
    loop = f"i=0; while [ $i -lt {count} ]; do echo $((i % 2)) > {{target}}; i=$((i+1)); done"
    probe = vm.run(f"echo 1 > {sysfs} && echo 0 > {sysfs} && echo ok", timeout=30)
    if probe.stdout.strip() != "ok":
        return {"skipped": f"the guest refused to move the channel: {probe.stderr.strip()}"}
    stats = vm.machine.stats
    exits0, msgs0 = stats.total(), vm.vmbus.messages_in
    t0 = time.monotonic()
    vm.run(loop.format(target=sysfs), timeout=300)
    with_write = time.monotonic() - t0
    exits = stats.total() - exits0
    msgs = vm.vmbus.messages_in - msgs0
    t0 = time.monotonic()
    vm.run(loop.format(target="/dev/null"), timeout=300)
    baseline = time.monotonic() - t0
    return {
        "moves": count,
        "modifychannel_messages": msgs,
        "round_trip_us": round((with_write - baseline) / count * 1e6, 1),
        "seconds_with_write": round(with_write, 3),
        "seconds_baseline": round(baseline, 3),
        "user_space_exits_per_move_incl_agent": round(exits / count, 2),
    }


def main() -> int:
    from benchlib import result_doc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="6.12")
    ap.add_argument("--round-trips", type=int, default=1000)
    ap.add_argument("--moves", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from hvlab.guest import kernels
    from hvlab.vmm.guestvm import GuestVM, GuestVMConfig

    results = {}
    for label in args.kernels.split(","):
        k = kernels.resolve(label, fetch_missing=False)
        with GuestVM(GuestVMConfig(kernel=k, smp=2, heartbeat_interval=3600)) as vm:
            vm.wait_ready()
            deadline = time.monotonic() + 30
            while not vm.heartbeat.negotiated and time.monotonic() < deadline:
                time.sleep(0.1)
            results[label] = {
                "release": k.release,
                "vmbus_version": vm.vmbus.snapshot()["version"],
                "ring": ring_round_trips(vm, args.round_trips),
                "message": message_round_trips(vm, args.moves),
            }
            vm.shutdown()
        print(json.dumps({label: results[label]}, indent=2), flush=True)
    doc = result_doc("vmbus", results)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
