"""Boot time: hvlab's VMM vs QEMU on the same kernel and initramfs, same accelerator, same place.

Run where KVM works (natively, or inside the nested runner):
    hvlab exec --rw benchmarks/results -- python3 benchmarks/bench_boot.py --out benchmarks/results/boot-<machine>.json
For each kernel: process start to agent ready ("@@HVLAB READY" on ttyS1) under hvlab's VMM, and under
`qemu-system-x86_64 -accel kvm -kernel ... -initrd ...`; the ratio; hvlab's user-space exits by kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3"


def hvlab_boot(label: str) -> dict:
    code = (
        "import json, time; t0 = time.monotonic()\n"
        "from hvlab.guest import kernels\n"
        "from hvlab.vmm.guestvm import GuestVM, GuestVMConfig\n"
        f"k = kernels.resolve({label!r}, fetch_missing=False)\n"
        "vm = GuestVM(GuestVMConfig(kernel=k, smp=2))\n"
        "vm.wait_ready(); ready = time.monotonic() - t0\n"
        "stats = dict(vm.machine.stats.by_kind); ports = {hex(p): n for p, n in vm.machine.stats.by_port.most_common(6)}\n"
        "vm.shutdown(); vm.close()\n"
        "print(json.dumps({'ready_s': ready, 'exits': stats, 'top_ports': ports}))\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["process_start_to_ready_s"] = data.pop("ready_s") + 0.0
    data["wall_s_incl_python_start"] = time.monotonic() - t0
    return data


def qemu_boot(label: str) -> dict | None:
    from hvlab.guest import initramfs, kernels

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    k = kernels.resolve(label, fetch_missing=False)
    initrd = initramfs.build_guest_initramfs(k)
    with tempfile.TemporaryDirectory() as d:
        agent = Path(d) / "ttyS1"
        agent.touch()
        t0 = time.monotonic()
        proc = subprocess.Popen([qemu, "-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "1024", "-nodefaults",
                                 "-display", "none", "-no-reboot", "-kernel", str(k.vmlinuz), "-initrd", str(initrd),
                                 "-append", CMDLINE, "-serial", f"file:{Path(d) / 'ttyS0'}",
                                 "-serial", f"file:{agent}"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while b"@@HVLAB READY" not in agent.read_bytes():
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    return None
                time.sleep(0.01)
            return {"process_start_to_ready_s": time.monotonic() - t0}
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernels", default="6.1,6.12,7.3")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = {}
    for label in args.kernels.split(","):
        h = hvlab_boot(label)
        q = qemu_boot(label)
        rows[label] = {"hvlab": h, "qemu": q,
                       "ratio_hvlab_over_qemu": round(h["process_start_to_ready_s"] / q["process_start_to_ready_s"], 2)
                       if q else None}
        print(label, json.dumps(rows[label]), flush=True)
    record = {
        "benchmark": "boot to agent ready, hvlab VMM vs QEMU (-kernel/-initrd), same KVM",
        "date": time.strftime("%Y-%m-%d"),
        "where": "inside the nested runner's L1 (KVM nested under QEMU TCG)" if os.environ.get("HVLAB_IN_L1")
                 else "native KVM",
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "guest": {"smp": 2, "mem_mib": 1024, "cmdline": CMDLINE},
        "results": rows,
    }
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
