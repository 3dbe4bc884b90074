"""What every benchmark result file says about where it ran (machine, and native or nested KVM)."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any


def result_doc(benchmark: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON document a benchmark writes: its name, date, machine, KVM placement, extras, results."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "kvm": "nested: KVM inside the nested runner's L1 (QEMU TCG, nested SVM)" if os.environ.get("HVLAB_IN_L1")
               else "native",
        **extra,
        "results": results,
    }
