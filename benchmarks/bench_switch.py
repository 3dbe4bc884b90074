"""Virtual switch throughput, in process: frames per second through Switch for 64 B and 1500 B frames.

    nice -n 10 python3 benchmarks/bench_switch.py --out benchmarks/results/switch-<machine>.json

Cases (each the median of --runs runs of --frames frames, sent flat out from one thread unless noted):
  unicast          learnt unicast between two ports, endpoints that accept and discard
  unicast+pcap     the same with both ports capturing to pcap files (flushed per frame)
  unicast+hook     with a pass-through rx hook (a drop hook whose predicate never matches)
  flood4           broadcast to 3 other ports (frames/s counts frames sent, not copies)
  2threads         two threads sending unicast in opposite directions at once
  endpoint-flow    sequenced UDP flow into a traffic.Endpoint (frame building, parsing, counting on
                   the endpoint's worker thread), measured until the receiver has counted them all
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import machine, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvlab.net.switch import Switch, mac_bytes  # noqa: E402

A, B = mac_bytes("02:00:00:00:00:0a"), mac_bytes("02:00:00:00:00:0b")


def frame(dst: bytes, src: bytes, size: int) -> bytes:
    return dst + src + b"\x88\xb5" + b"\0" * (size - 14)


def sink(_f: bytes) -> None:
    return None


def two_ports(pcap_dir: str | None = None, hook: bool = False):
    sw = Switch("bench")
    a, b = sw.add_port("a", sink), sw.add_port("b", sink)
    a.send(frame(b"\xff" * 6, A, 64))
    b.send(frame(A, B, 64))
    if pcap_dir:
        a.set_pcap(Path(pcap_dir) / "a.pcap")
        b.set_pcap(Path(pcap_dir) / "b.pcap")
    if hook:
        a.drop("rx", match=lambda f: False)
    return sw, a, b


def run_case(case: str, size: int, n: int) -> float:
    if case == "endpoint-flow":
        return endpoint_flow(size, n)
    with tempfile.TemporaryDirectory() as d:
        if case == "flood4":
            sw = Switch("bench")
            ports = [sw.add_port(f"p{i}", sink) for i in range(4)]
            f = frame(b"\xff" * 6, A, size)
            send = ports[0].send
            t0 = time.perf_counter()
            for _ in range(n):
                send(f)
            dt = time.perf_counter() - t0
        else:
            sw, a, b = two_ports(d if case == "unicast+pcap" else None, hook=case == "unicast+hook")
            fa, fb = frame(B, A, size), frame(A, B, size)
            if case == "2threads":
                def blast(port, f, k):
                    for _ in range(k):
                        port.send(f)
                ts = [threading.Thread(target=blast, args=(a, fa, n // 2)),
                      threading.Thread(target=blast, args=(b, fb, n // 2))]
                t0 = time.perf_counter()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                dt = time.perf_counter() - t0
            else:
                send = a.send
                t0 = time.perf_counter()
                for _ in range(n):
                    send(fa)
                dt = time.perf_counter() - t0
        bal = sw.balance()
        assert bal["ok"] and bal["dropped"] == 0, bal
        sw.close()
    return n / dt


def endpoint_flow(size: int, n: int) -> float:
    from hvlab.net.topology import default_topology
    from hvlab.net.traffic import UDP_OVERHEAD, Endpoint

    with default_topology() as topo:
        g = Endpoint(topo.switch, "guest", mac="00:15:5d:00:02:02", ip="192.0.2.2")
        g.resolve("192.0.2.1")
        t0 = time.perf_counter()
        topo.responder.udp_flow("192.0.2.2", 9000, count=n, rate=0, flow=1, size=max(24, size - UDP_OVERHEAD))
        ok = g.flows.wait(1, n, 120)
        dt = time.perf_counter() - t0
        st = g.flows.stats(1, expected=n)
        assert ok and st.lost == 0, st
        g.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cases = ["unicast", "unicast+pcap", "unicast+hook", "flood4", "2threads", "endpoint-flow"]
    results: dict[str, dict[str, float]] = {}
    for case in cases:
        for size in (64, 1500):
            n = a.frames if case != "endpoint-flow" else a.frames // 5
            rates = [run_case(case, size, n) for _ in range(a.runs)]
            med = statistics.median(rates)
            results.setdefault(case, {})[f"{size}B_fps"] = round(med)
            results[case][f"{size}B_Mbit_s"] = round(med * size * 8 / 1e6, 1)
            print(f"{case:14s} {size:5d} B  {med:10,.0f} frames/s  ({med * size * 8 / 1e6:7.1f} Mbit/s)",
                  flush=True)
    out = {
        "benchmark": "virtual switch throughput (in process)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "where": "host, in process (no VM), nice -n 10, other engineers' jobs sharing the 2 cores",
        "frames_per_run": a.frames, "runs": a.runs, "statistic": "median",
        "results": results,
    }
    write_result(out, a.out, echo=False)
    if a.out:
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
