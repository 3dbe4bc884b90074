"""What every benchmark result file says about where it ran (machine, and native or nested KVM)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The facts every result records about where it ran; the load average because the machine is
    shared and a busy one measures slower."""
    facts: dict[str, Any] = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                             "cpu": "?", "mem_gib": 0, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            facts["mem_gib"] = next((int(ln.split()[1]) >> 20 for ln in f if ln.startswith("MemTotal:")), 0)
    except OSError:
        pass
    facts["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return facts


def write_result(doc: dict[str, Any], out: Path | None, *, echo: bool = True) -> None:
    """Print the result document (unless ``echo`` is False) and write it to ``out`` if given."""
    text = json.dumps(doc, indent=2)
    if echo:
        print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def result_doc(benchmark: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON document a benchmark writes: its name, date, machine, KVM placement, extras, results."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "kvm": "nested: KVM inside the nested runner's L1 (QEMU TCG, nested SVM)" if os.environ.get("HVLAB_IN_L1")
               else "native",
        **extra,
        "results": results,
    }
