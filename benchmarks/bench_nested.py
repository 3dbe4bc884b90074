"""Nested runner: time from `hvlab exec` start to the command running inside L1, and L1 memory use.

Run on the host:  python3 benchmarks/bench_nested.py [--runs 3] [--out benchmarks/results/nested-<machine>.json]
Two commands are timed: a shell one (L1 boot + 9p root) and a Python one (adds Python's start over 9p).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import machine, write_result

PROBE = ("import time, sys; print('T', time.time()); "
         "m = dict(l.split(':', 1) for l in open('/proc/meminfo')); "
         "kb = lambda k: int(m[k].split()[0]); print('USED_KB', kb('MemTotal') - kb('MemAvailable'))")


def one(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hvlab", "-q", "exec", "--nested", "--", *cmd],
                          capture_output=True, text=True, timeout=600)
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {proc.stderr}")
    out = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line[:1].isupper())
    return {"to_command_s": float(out["T"]) - t0, "total_s": t1 - t0,
            "l1_used_mib": int(out.get("USED_KB", 0)) / 1024 if "USED_KB" in out else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    for name, cmd in (("shell", ["sh", "-c", "echo T $(date +%s.%N)"]), ("python", [sys.executable, "-c", PROBE])):
        runs = [one(cmd) for _ in range(args.runs)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in ("to_command_s", "total_s")}
        if name == "python":
            results[name]["l1_used_mib"] = runs[-1]["l1_used_mib"]
        print(name, results[name], flush=True)
    qemu_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = {
        "benchmark": "nested runner start-up",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "l1": "QEMU 7.2 TCG single-threaded, -cpu EPYC,+svm,+npt, -smp 2, 6144 MiB; Debian 6.12 generic L1 kernel",
        "runs": args.runs, "median": results,
        "host_peak_child_rss_mib": round(qemu_rss, 1),
    }
    write_result(record, args.out)


if __name__ == "__main__":
    main()
