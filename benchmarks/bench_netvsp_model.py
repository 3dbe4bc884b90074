"""netvsp throughput in-process: frames/s through NetvspDevice against the pure-Python netvsc guest model.

Both directions, 64-byte and 1500-byte frames, one channel (vRSS off), Linux's buffer sizes:
* rx: ``deliver`` one frame at a time (one transfer-page packet each) and ``deliver_many`` bursts of 64
  (one packet per burst), the guest model receiving and completing after each call;
* tx: the guest model sending batches of RNDIS packets per send section (netvsc's copy path: up to
  max_pkt_per_msg = 8 that fit the 6144-byte section, i.e. 8 × 64 B or 3 × 1500 B) and
  single frames through GPA-direct page ranges.
``device_share`` is the fraction of the wall time spent inside the device (deliver / on_packet), the rest
being the guest model and the ring code on the guest side — what a real guest does in the kernel.

    python3 benchmarks/bench_netvsp_model.py --out benchmarks/results/netvsp-model-<machine>.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchlib import machine, write_result

from hvlab.vmbus.netvsc_model import make_testbed

MAC = bytes.fromhex("00155d000001")
PEER = bytes.fromhex("020000000002")


def frame(size: int, to_guest: bool) -> bytes:
    dst, src = (MAC, PEER) if to_guest else (PEER, MAC)
    return dst + src + b"\x88\xb5" + bytes(size - 14)


class DeviceClock:
    """Accumulates the time spent inside the device's entry points."""

    def __init__(self, device: Any) -> None:
        self.seconds = 0.0
        for name in ("deliver", "deliver_many", "on_packet"):
            self._wrap(device, name)

    def _wrap(self, device: Any, name: str) -> None:
        inner = getattr(device, name)

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(device, name, timed)


def bench(direction: str, mode: str, size: int, seconds: float) -> dict[str, Any]:
    tb = make_testbed(ring_pages=128, recv_sections=2048, send_sections=170, cpus=1, memory_size=64 << 20)
    g, dev = tb.netvsc, tb.device
    clock = DeviceClock(dev)
    f = frame(size, to_guest=direction == "rx")
    burst = [f] * 64
    per_section = min(8, g.send_section_size // ((44 + size + 7) // 8 * 8))  # netvsc fills a section
    frames = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if direction == "rx" and mode == "single":
            assert dev.deliver(f) is None
            frames += 1
        elif direction == "rx":
            assert dev.deliver_many(burst) == [None] * 64
            frames += 64
        elif mode == "batch":
            g.send_batch([f] * per_section)
            frames += per_section
        else:
            g.send(f, mode="gpa")
            frames += 1
        g.poll()
        if direction == "rx" and len(g.rx) > 10_000:
            g.rx.clear()
        if len(tb.port.sent) > 10_000:
            tb.port.sent.clear()
    g.wait_tx_idle()
    wall = time.perf_counter() - t0
    ok = dev.counters["rx_frames" if direction == "rx" else "tx_frames"]
    assert ok == frames and not tb.bus.server.violations, (ok, frames)
    return {
        "direction": direction,
        "mode": mode,
        "frames_per_vmbus_packet": 64 if mode == "burst64" else per_section if mode == "batch" else 1,
        "frame_bytes": size,
        "frames": frames,
        "seconds": round(wall, 3),
        "frames_per_s": round(frames / wall),
        "mbit_per_s": round(frames * size * 8 / wall / 1e6, 1),
        "device_share": round(clock.seconds / wall, 3),
        "device_frames_per_s": round(frames / clock.seconds) if clock.seconds else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    for direction, mode in (("rx", "single"), ("rx", "burst64"), ("tx", "batch"), ("tx", "gpa")):
        for size in (64, 1500):
            r = bench(direction, mode, size, args.seconds)
            results.append(r)
            print(
                f"{direction} {mode:8} {size:5} B: {r['frames_per_s']:>8} frames/s "
                f"({r['mbit_per_s']} Mbit/s), device {r['device_share'] * 100:.0f}% "
                f"→ {r['device_frames_per_s']} frames/s device-only"
            )
    doc = {
        "benchmark": "netvsp device vs netvsc guest model, in-process",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "where": "host (Debian 12), no VM",
        "note": "machine shared by 5 engineers: expect ±30 % between runs",
        "setup": "one channel, 512 KiB rings, 2048 receive sections of 1728 B, 170 send sections of 6144 B",
        "results": results,
    }
    write_result(doc, args.out, echo=False)


if __name__ == "__main__":
    main()
