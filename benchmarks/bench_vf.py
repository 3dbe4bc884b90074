"""VF path speed: vfio-user round trip for a BAR read, and vmxnet3 packets/s, in process and under QEMU.

    nice -n 10 python3 benchmarks/bench_vf.py --out benchmarks/results/vf-<machine>.json [--no-qemu]

In process (client and server threads in this Python): BAR1 register read round trip (REGION_READ over
the Unix socket), MiniDriver tx frames/s (one non-posted doorbell write per frame) and the device's
deliver() rx frames/s into the ring.

Under QEMU 11 (TCG, this host, one vCPU, 6.12 guest): a BAR read from guest user space (mmap of
/sys/bus/pci/devices/.../resource1, a static C loop compiled here) -- every read is a vfio-user
REGION_READ from QEMU to hvlab's server; guest -> switch UDP packets/s unpaced (64-byte payloads, counted
by the responder); switch -> guest packets/s at increasing offered rates (counted by hvlab-udp recv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BARREAD_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY | O_SYNC);
    if (fd < 0) { perror("open"); return 2; }
    volatile uint32_t *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 2; }
    long n = atol(argv[2]);
    uint32_t v = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) v += p[0];
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n;
    printf("{\"reads\": %ld, \"us_per_read\": %.2f, \"vrrs\": %lu}\n", n, us, (unsigned long)(v / n));
    return 0;
}
"""


class CountingPort:
    def __init__(self) -> None:
        self.n = 0

    def send(self, frame: bytes) -> None:
        self.n += 1


def in_process(reads: int, frames: int) -> dict:
    from hvlab.net.switch import mac_bytes
    from hvlab.protocol import vmxnet3 as V
    from hvlab.vf.testing import GuestMemory, MiniDriver
    from hvlab.vf.vmxnet3 import Vmxnet3
    from hvlab.vfio_user import VfioUserClient, VfioUserServer

    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        port = CountingPort()
        dev = Vmxnet3("00:15:5d:00:02:02", port=port)
        srv = VfioUserServer(dev, Path(d) / "s.sock").start()
        c = VfioUserClient.connect(srv.path, retry_for=3)
        c.negotiate()
        mem = GuestMemory()
        mem.map(c)
        drv = MiniDriver(c, mem, ring_size=256)
        drv.probe()
        drv.activate()
        samples = []
        for _ in range(reads):
            t0 = time.perf_counter_ns()
            c.bar_read(1, V.Bar1.VRRS, 4)
            samples.append(time.perf_counter_ns() - t0)
        out["bar_read_round_trip_us"] = {"median": statistics.median(samples) / 1e3,
                                         "p99": sorted(samples)[int(len(samples) * 0.99)] / 1e3, "n": reads}
        frame = bytes(6) + mac_bytes("02:00:00:00:00:01") + b"\x08\x00" + bytes(50)
        t0 = time.perf_counter()
        for _ in range(frames):
            drv.send(frame)
            drv.tx_completions()
        el = time.perf_counter() - t0
        out["tx_frames_per_s"] = round(frames / el)
        assert port.n == frames
        rx = bytes.fromhex("00155d000202") + bytes(6) + b"\x08\x00" + bytes(50)
        got = 0
        t0 = time.perf_counter()
        for _ in range(frames):
            got += dev.deliver(rx) is None
            drv.receive()
        el = time.perf_counter() - t0
        out["rx_deliver_frames_per_s"] = round(frames / el)
        assert got == frames
        c.close()
        srv.stop()
        mem.close()
    return out


def under_qemu(kernel: str) -> dict:
    from hvlab.qemu.runner import QemuVfConfig, QemuVfGuest

    out: dict = {"accelerator": "tcg", "vcpus": 1, "kernel": kernel}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "barread.c"
        src.write_text(BARREAD_C)
        exe = Path(d) / "barread"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(src)], check=True)
        tool = exe.read_bytes()
    with QemuVfGuest(QemuVfConfig(kernel=kernel)) as g:
        out["qemu"] = g.meta["qemu"]
        g.setup_network()
        g.agent.put("/tmp/barread", tool)
        g.run("chmod +x /tmp/barread").check()
        # guest -> switch: offered rates, then unpaced (the guest's qdisc drops what the ring cannot take)
        tx = []
        for i, rate in enumerate((1000, 2000, 4000, 0)):
            n = rate * 3 if rate else 20000
            flow = 30 + i
            before = g.device.counters["tx_frames"]
            r = g.run(f"hvlab-udp send -d 192.0.2.1 -p 9000 -n {n} -r {rate} -s 64 -f {flow}", 300).check()
            sent = json.loads(r.stdout)
            g.responder.flows.wait(flow, n, timeout=5)
            st = g.responder.flows.stats(flow, expected=n)
            tx.append({"offered_pps": rate or "unpaced", "sent": sent["sent"], "elapsed_s": sent["elapsed"],
                       "device_tx_frames": g.device.counters["tx_frames"] - before,
                       "received": st.unique, "lost": st.lost, "pps": round(st.unique / sent["elapsed"])})
        out["guest_to_switch"] = tx
        out["guest_tx_stats"] = g.run(f"ip -s link show {g.iface}").stdout
        # switch -> guest at offered rates
        rx = []
        for i, rate in enumerate((1000, 2000, 4000)):
            count = rate * 3
            flow = 40 + i
            g.run(f"rm -f /tmp/r.json; hvlab-udp recv -p 9001 -t 15 -n {count} >/tmp/r.json 2>/tmp/r.err &")
            g.run("for i in $(seq 50); do grep -q listening /tmp/r.err && exit 0; sleep 0.1; done")
            rep = g.responder.udp_flow("192.0.2.2", 9001, count=count, rate=rate, flow=flow)
            r = g.run("for i in $(seq 200); do [ -s /tmp/r.json ] && break; sleep 0.1; done; cat /tmp/r.json", 40)
            f = [x for x in json.loads(r.stdout)["flows"] if x["flow"] == flow]
            got = f[0]["unique"] if f else 0
            udp = g.run("grep '^Udp:' /proc/net/snmp | tail -1").stdout.split()
            rx.append({"offered_pps": rate, "sent": rep.sent, "send_elapsed_s": round(rep.elapsed, 3),
                       "received": got, "lost": count - got, "pps": round(got / rep.elapsed),
                       "guest_udp_rcvbuf_errors_total": int(udp[5]) if len(udp) > 5 else None,
                       "vf_port_no_rx_buffer_total": g.port.counters.drops.get("no-rx-buffer", 0),
                       "host_loadavg": os.getloadavg()[0]})
        out["switch_to_guest"] = rx
        out["vf_port_drops"] = dict(g.port.counters.drops)
        # BAR read from guest user space: the driver must let go of the BAR first (IO_STRICT_DEVMEM).
        dev = g.run(f"basename $(readlink /sys/class/net/{g.iface}/device)").stdout.strip()
        g.run(f"echo {dev} > /sys/bus/pci/drivers/vmxnet3/unbind").check()
        r = g.run(f"/tmp/barread /sys/bus/pci/devices/{dev}/resource1 2000", 120).check()
        out["guest_bar_read"] = json.loads(r.stdout)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    from benchlib import machine, write_result

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "in_process": in_process(args.reads, args.frames)}
    print(json.dumps(result["in_process"]), file=sys.stderr)
    if not args.no_qemu:
        result["qemu_tcg"] = under_qemu(args.kernel)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    raise SystemExit(main())
