"""Boot time: hvlab's VMM vs QEMU on the same kernel and initramfs, same accelerator, same place.

    python3 benchmarks/bench_boot.py --runs 3 --out benchmarks/results/boot-<machine>.json

Where KVM here cannot run stock guests the script re-runs itself inside the nested runner's L1
(`hvlab exec`), so both VMMs use the same KVM (L1's kvm_amd), and records this machine's facts too.
For each kernel and run, alternating hvlab and QEMU:
  * hvlab: `python3 -c <boot a GuestVM>` from spawn to the agent's "@@HVLAB READY" (so Python's own start
    and imports count, as QEMU's process start does); also the time inside the process, and hvlab's
    user-space exits by kind during boot;
  * QEMU: `qemu-system-x86_64 -accel kvm -cpu host,kvm=off -kernel -initrd` (SeaBIOS + linuxboot option ROM) from
    spawn to the same agent line on its second serial port.
Both use the same bzImage, the same (cached) initramfs, 2 vCPUs, 1 GiB and the same command line.  KVM's
own per-vCPU exit counters (debugfs, when mounted) are recorded for both: they count every exit, not
only those that reach user space.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, write_result

CMDLINE = "console=ttyS0 panic=-1 reboot=acpi quiet loglevel=3"  # GuestVM's default command line
READY = b"@@HVLAB READY"
TIMEOUT = 300.0
MAX_EXTRA_RUNS = 2
# kvm=off: hvlab's guest does not see KVM's paravirt leaves (it sees Hyper-V), so neither does QEMU's.  With
# KVM's leaves (kvm-clock) QEMU's guests in the nested runner sat idle for minutes after ACPI set-up.
QEMU_CPU = "host,kvm=off"
KVM_DEBUGFS = Path("/sys/kernel/debug/kvm")
KVM_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "insn_emulation")

HVLAB_CHILD = """\
import json, sys, time
t0 = time.monotonic()
from hvlab.guest import kernels
from hvlab.vmm.guestvm import GuestVM, GuestVMConfig
k = kernels.resolve(sys.argv[1], fetch_missing=False)
vm = GuestVM(GuestVMConfig(kernel=k, smp=2))
vm.agent.wait_ready(300)  # the agent's READY line, as for QEMU (GuestVM.wait_ready goes on to set up eth0)
in_process = time.monotonic() - t0
print("READY", flush=True)
sys.stdin.readline()  # the parent has read KVM's counters
stats = {"in_process_s": in_process, "exits": dict(vm.machine.stats.by_kind),
         "top_ports": {hex(p): n for p, n in vm.machine.stats.by_port.most_common(6)}}
vm.shutdown(); vm.close()
print(json.dumps(stats), flush=True)
"""


def kvm_counters(pid: int) -> dict[str, int] | None:
    """Sum of KVM's per-vCPU debugfs counters for the VM(s) of process ``pid``; None without debugfs."""
    totals = dict.fromkeys(KVM_COUNTERS, 0)
    vms = list(KVM_DEBUGFS.glob(f"{pid}-*")) if KVM_DEBUGFS.is_dir() else []
    if not vms:
        return None
    for vm in vms:
        for vcpu in vm.glob("vcpu*"):
            for name in KVM_COUNTERS:
                try:
                    totals[name] += int((vcpu / name).read_text())
                except (OSError, ValueError):
                    pass
    return totals


def hvlab_boot(label: str) -> dict:
    # stderr to a file, not a pipe: the VMM logs (VMBus, devices) could fill a pipe nobody reads yet
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", HVLAB_CHILD, label], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            ready_now, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
            line = proc.stdout.readline() if ready_now else ""
            ready = time.monotonic() - t0
            if line.strip() != "READY":
                proc.kill()
                proc.wait()
                err.seek(0)
                return {"failed": (line + err.read().decode(errors="replace"))[-1500:]}
            counters = kvm_counters(proc.pid)
            out, _ = proc.communicate("\n", timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    data = json.loads(out.strip().splitlines()[-1])
    return {"spawn_to_ready_s": round(ready, 3), "in_process_to_ready_s": round(data["in_process_s"], 3),
            "user_space_exits": data["exits"], "user_space_exits_total": sum(data["exits"].values()),
            "top_ports": data["top_ports"], "kvm_counters": counters}


def qemu_boot(qemu: str, vmlinuz: Path, initrd: Path, timeout: float, cpu: str = QEMU_CPU) -> dict:
    with tempfile.TemporaryDirectory() as d:
        agent = Path(d) / "ttyS1"
        agent.touch()
        t0 = time.monotonic()
        proc = subprocess.Popen([qemu, "-accel", "kvm", "-cpu", cpu, "-smp", "2", "-m", "1024", "-nodefaults",
                                 "-display", "none", "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd),
                                 "-append", CMDLINE, "-serial", f"file:{Path(d) / 'ttyS0'}",
                                 "-serial", f"file:{agent}"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while READY not in agent.read_bytes():
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    console = (Path(d) / "ttyS0").read_bytes().decode(errors="replace")
                    panic = console.find("Kernel panic")
                    return {"failed": f"no agent after {time.monotonic() - t0:.0f} s (QEMU exit {proc.returncode}): "
                                      f"{proc.stderr.read()[-500:].decode(errors='replace')}",
                            "console_tail": console[max(0, panic - 1500):][:2000] if panic >= 0 else console[-1500:]}
                time.sleep(0.005)
            ready = time.monotonic() - t0
            return {"spawn_to_ready_s": round(ready, 3), "kvm_counters": kvm_counters(proc.pid)}
        finally:
            proc.kill()
            proc.wait()


def median_of(runs: list[dict], key: str) -> float | None:
    ok = [r[key] for r in runs if "failed" not in r]
    return round(statistics.median(ok), 3) if ok else None


def bench_kernel(label: str, runs: int, qemu: str | None, qemu_timeout: float) -> dict:
    from hvlab.guest import initramfs, kernels

    k = kernels.resolve(label, fetch_missing=False)
    initrd = initramfs.build_guest_initramfs(k)  # cached: GuestVM gets the same file
    hv, qm = [], []
    for _ in range(runs + MAX_EXTRA_RUNS):  # failed boots are recorded and replaced, a few times at most
        if sum("failed" not in r for r in hv) < runs:
            hv.append(hvlab_boot(label))
            print(f"  {label} hvlab: {hv[-1].get('spawn_to_ready_s', 'failed')}", file=sys.stderr, flush=True)
        if qemu and sum("failed" not in r for r in qm) < runs and not any("no agent" in r.get("failed", "") for r in qm):
            qm.append(qemu_boot(qemu, k.vmlinuz, initrd, qemu_timeout))
            print(f"  {label} qemu: {qm[-1].get('spawn_to_ready_s', 'failed')}", file=sys.stderr, flush=True)
    row: dict = {"release": k.release, "hvlab": {"median_spawn_to_ready_s": median_of(hv, "spawn_to_ready_s"),
                                                 "median_in_process_to_ready_s": median_of(hv, "in_process_to_ready_s"),
                                                 "runs": hv}}
    if qm:
        row["qemu"] = {"median_spawn_to_ready_s": median_of(qm, "spawn_to_ready_s"), "runs": qm}
        h, q = row["hvlab"]["median_spawn_to_ready_s"], row["qemu"]["median_spawn_to_ready_s"]
        row["ratio_hvlab_over_qemu"] = round(h / q, 2) if h and q else None
    return row


def run_nested(argv: list[str], out: Path | None) -> int:
    """Re-run this script in the nested runner's L1, handing it this machine's facts."""
    cmd = ["hvlab", "exec", "--timeout", "1800"]
    if out is not None:
        cmd += ["--rw", str(out.resolve().parent)]
    env = dict(os.environ, HVLAB_BENCH_HOST=json.dumps(machine()))
    return subprocess.call(cmd + ["--", sys.executable, str(Path(__file__).resolve()), *argv], env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="6.1,6.12,7.3", help="comma-separated kernel labels")
    ap.add_argument("--runs", type=int, default=3, help="boots per kernel and VMM (medians are reported)")
    ap.add_argument("--qemu-timeout", type=float, default=TIMEOUT,
                    help="give up on a QEMU boot after this many seconds (not retried)")
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args()

    from hvlab import placement
    from hvlab.nested import runner

    if placement.choose() == "nested":
        return run_nested(sys.argv[1:], args.out)
    qemu = shutil.which("qemu-system-x86_64")
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if qemu else None
    rows = {}
    for label in args.kernels.split(","):
        rows[label] = bench_kernel(label, args.runs, qemu, args.qemu_timeout)
        r = rows[label]
        print(f"{label}: hvlab {r['hvlab']['median_spawn_to_ready_s']} s, "
              f"qemu {r.get('qemu', {}).get('median_spawn_to_ready_s')} s, ratio {r.get('ratio_hvlab_over_qemu')}",
              file=sys.stderr, flush=True)
    nested = runner.in_l1()
    record = {
        "benchmark": "process spawn to agent ready: hvlab's VMM vs QEMU -kernel/-initrd, same KVM, same place",
        "date": time.strftime("%Y-%m-%d"),
        "nested": nested,
        "where": ("inside the nested runner's L1 VM (KVM nested under QEMU TCG on the host)" if nested
                  else "directly on this machine's KVM"),
        "host": json.loads(os.environ["HVLAB_BENCH_HOST"]) if os.environ.get("HVLAB_BENCH_HOST") else None,
        "kvm_machine": machine(),
        "qemu": version,
        "qemu_cpu": QEMU_CPU,
        "guest": {"smp": 2, "mem_mib": 1024, "cmdline": CMDLINE, "runs": args.runs},
        "results": rows,
    }
    write_result(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
