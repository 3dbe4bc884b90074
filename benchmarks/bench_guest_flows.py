"""UDP flows with a real guest: host -> guest and guest -> host through hv_netvsc, netvsp, the switch and
the responder, counted at both ends and checked against both ports' pcaps.

Run where KVM works (natively, or inside the nested runner):
    hvlab exec --rw benchmarks/results -- python3 benchmarks/bench_guest_flows.py \\
        --out benchmarks/results/guest-flows-<machine>.json
For each nominal rate: the flow's datagram counts at the receiver (lost, duplicated, reordered), the
rate the sender really achieved, and whether each port's pcap holds every sequence number once and in
order. Exit status 1 if any flow lost, duplicated or reordered a datagram.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchlib import machine, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from hvlab.guest import kernels
    from hvlab.net import topology
    from hvlab.net.traffic import guest_to_host, host_to_guest, pcap_flow_seqs
    from hvlab.vmm.guestvm import GuestVM, GuestVMConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--rates", default="300:1000,1000:3000", help="RATE:COUNT pairs (pps:datagrams)")
    ap.add_argument("--size", type=int, default=512, help="UDP payload bytes")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    vm = GuestVM(GuestVMConfig(kernel=kernels.resolve(a.kernel, fetch_missing=False), smp=2, pcap=True))
    results: dict[str, dict] = {}
    flow = 100
    try:
        vm.wait_ready()
        resp = vm.net.responder
        for pair in a.rates.split(","):
            rate, count = (int(x) for x in pair.split(":"))
            flow += 1
            rep, got = host_to_guest(vm.run, resp, topology.GUEST_IP, count=count, rate=rate, flow=flow,
                                     size=a.size)
            results[f"host_to_guest_{rate}pps"] = {
                "flow": flow, "count": count, "achieved_pps": round(rep.sent / rep.elapsed, 1),
                "receiver": {k: got[k] for k in ("received", "lost", "duplicates", "reordered")}}
            flow += 1
            sent, st = guest_to_host(vm.run, resp, count=count, rate=rate, flow=flow, size=a.size)
            results[f"guest_to_host_{rate}pps"] = {
                "flow": flow, "count": count, "achieved_pps": round(sent["sent"] / sent["elapsed"], 1),
                "receiver": {k: getattr(st, k) for k in ("received", "lost", "duplicates", "reordered")}}
        for r in results.values():
            r["pcaps_complete_in_order"] = all(
                pcap_flow_seqs(vm.run_dir / name, r["flow"]) == list(range(r["count"]))
                for name in ("responder.pcap", "nic0.pcap"))
        balance = vm.net.switch.balance()
    finally:
        vm.shutdown()
        vm.close()
    out = {
        "benchmark": "UDP flows with a real guest (hv_netvsc <-> netvsp <-> switch <-> responder)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "guest": {"kernel": a.kernel, "smp": 2, "payload_bytes": a.size},
        "results": results, "switch_balance": balance, "run_dir": str(vm.run_dir),
    }
    write_result(out, a.out)
    clean = all(r["receiver"]["lost"] == r["receiver"]["duplicates"] == r["receiver"]["reordered"] == 0
                and r["pcaps_complete_in_order"] for r in results.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
