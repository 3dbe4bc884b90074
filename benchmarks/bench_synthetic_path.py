"""Synthetic-path throughput with a real guest: packets/s and Mbit/s both ways, with user-space exits.

Run where KVM works (natively, or inside the nested runner):
    hvlab exec --rw benchmarks/results -- python3 benchmarks/bench_synthetic_path.py \\
        --out benchmarks/results/synthetic-path-<machine>.json

guest -> host: the guest's hvlab-udp sends flat out (no pacing) through hv_netvsc; the responder counts
what reaches it. host -> guest: the host hands netvsp frames in bursts (``deliver_many``, one
transfer-page packet per burst, as Hyper-V batches), and the guest's hvlab-udp counts what its socket
got. Frame sizes: 66 B (the smallest that carries the flow header: seq, flow id, timestamp) and 1500 B.
Exits are the VMM's user-space exits during the transfer (all kinds), divided by packets delivered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADERS = 14 + 20 + 8  # Ethernet, IPv4, UDP


def guest_to_host(vm, count: int, frame: int, flow: int) -> dict:
    from hvlab.net import topology

    resp = vm.net.responder
    exits0 = vm.machine.stats.total()
    r = vm.run(f"hvlab-udp send -d {topology.RESPONDER_IP} -p {topology.UDP_FLOW_PORT} -n {count} -r 0 "
               f"-f {flow} -s {frame - HEADERS}", timeout=600)
    sent = json.loads(r.stdout.strip().splitlines()[-1])
    exits = vm.machine.stats.total() - exits0
    # The responder (Python) may lag behind a flat-out guest: wait until it has been quiet for 3 s, so a
    # backlog is not counted as loss. netvsp's and the switch's counters show where any loss happened.
    resp.flows.wait_quiet(flow, 3.0, 120)
    st = resp.flows.stats(flow, expected=count)
    pps = st.unique / sent["elapsed"]
    return {"frame_bytes": frame, "sent": sent["sent"], "send_errors": sent["errors"],
            "netvsp_tx_frames": vm.net.nics[0].counters["tx_frames"],
            "switch_drops": {n: dict(p.counters.drops) for n, p in vm.net.switch.ports.items()},
            "received": st.unique, "lost": st.lost, "seconds": round(sent["elapsed"], 3),
            "pps": round(pps, 1), "mbit_s": round(pps * frame * 8 / 1e6, 3),
            "user_space_exits": exits, "exits_per_packet": round(exits / max(st.unique, 1), 3)}


def host_to_guest(vm, count: int, frame: int, flow: int, burst: int) -> dict:
    from hvlab.net import topology
    from hvlab.net.traffic import UdpFrameBuilder, flow_payload, tool_report

    nic = vm.net.nics[0]
    b = UdpFrameBuilder(topology.RESPONDER_MAC, vm.net.guest_mac, topology.RESPONDER_IP, topology.GUEST_IP,
                        40000, topology.UDP_FLOW_PORT)
    frames = [b.build(flow_payload(flow, seq, frame - HEADERS)) for seq in range(count)]
    base = f"/tmp/bench.{flow}"
    vm.run(f"hvlab-udp recv -p {topology.UDP_FLOW_PORT} -n {count} -t 300 -i 3 </dev/null >{base}.json "
           f"2>{base}.err & n=0; until grep -q listening {base}.err; do n=$((n+1)); [ $n -gt 200 ] && exit 1; "
           "sleep 0.05; done", timeout=30)
    drops0 = sum(nic.drops.values())
    exits0 = vm.machine.stats.total()
    t0 = time.monotonic()
    accepted = 0
    for i in range(0, count, burst):
        for reason in nic.deliver_many(frames[i:i + burst]):
            accepted += reason is None
        wait_until = time.monotonic() + 10
        while nic.ready and nic.snapshot()["recv_sections"][1] < burst and time.monotonic() < wait_until:
            time.sleep(0.0005)  # let the guest return receive sections (completions) before the next burst
    host_s = time.monotonic() - t0
    r = vm.run(f"n=0; until [ -s {base}.json ]; do n=$((n+1)); [ $n -gt 600 ] && exit 1; sleep 0.1; done; "
               f"cat {base}.json", timeout=120)
    got = next(f for f in tool_report(r.stdout)["flows"] if f["flow"] == flow)
    exits = vm.machine.stats.total() - exits0
    pps = got["unique"] / host_s
    return {"frame_bytes": frame, "burst": burst, "handed_to_netvsp": count, "accepted_by_netvsp": accepted,
            "netvsp_drops": sum(nic.drops.values()) - drops0, "received_by_guest": got["unique"],
            "lost": got["lost"], "seconds": round(host_s, 3), "pps": round(pps, 1),
            "mbit_s": round(pps * frame * 8 / 1e6, 3),
            "user_space_exits": exits, "exits_per_packet": round(exits / max(got["unique"], 1), 3)}


def main() -> int:
    from benchlib import result_doc

    from hvlab.guest import kernels
    from hvlab.vmm.guestvm import GuestVM, GuestVMConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    k = kernels.resolve(a.kernel, fetch_missing=False)
    results: dict[str, dict] = {}
    with GuestVM(GuestVMConfig(kernel=k, smp=2)) as vm:
        vm.wait_ready()
        flow = 200
        for frame in (66, 1500):
            flow += 1
            results[f"guest_to_host_{frame}B"] = guest_to_host(vm, a.count, frame, flow)
            print(json.dumps(results[f"guest_to_host_{frame}B"]), flush=True)
            flow += 1
            results[f"host_to_guest_{frame}B"] = host_to_guest(vm, a.count, frame, flow, a.burst)
            print(json.dumps(results[f"host_to_guest_{frame}B"]), flush=True)
        vm.shutdown()
    doc = result_doc("synthetic-path", results, guest={"kernel": k.label, "release": k.release, "smp": 2})
    if a.out:
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
