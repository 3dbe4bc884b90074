"""Where KVM work runs: natively on /dev/kvm, or through the nested runner.

The verdict comes from the probe guest (``hvlab.kvm.probe``), cached per boot of this machine in
``/run/hvlab`` (or the cache dir) because it cannot change without a reboot or a module reload.
``HVLAB_NESTED=never|always`` overrides the choice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hvlab.errors import KvmUnusable
from hvlab.kvm.probe import ProbeResult, run_probe
from hvlab.nested import runner


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cache_file() -> Path:
    run = Path("/run/hvlab")
    try:
        run.mkdir(parents=True, exist_ok=True)
        return run / "kvm-verdict.json"
    except OSError:
        from hvlab import paths

        return paths.cache_dir() / "kvm-verdict.json"


def kvm_verdict(refresh: bool = False) -> ProbeResult:
    """Whether /dev/kvm here runs stock guests (probed once per boot, then cached)."""
    cache = _cache_file()
    key = f"{_boot_id()}:{os.environ.get(runner.IN_L1_ENV, '0')}"
    if not refresh and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return ProbeResult(**data["result"])
        except (ValueError, KeyError, TypeError):
            pass
    result = run_probe()
    try:
        cache.write_text(json.dumps({"key": key, "result": json.loads(result.to_json())}))
    except OSError:
        pass
    return result


def choose() -> str:
    """``"native"`` or ``"nested"``; raises KvmUnusable when neither can work."""
    mode = os.environ.get("HVLAB_NESTED", "auto")
    if runner.in_l1():
        verdict = kvm_verdict()
        if not verdict.usable:
            raise KvmUnusable(f"inside the L1 VM KVM is not usable either: {verdict.reason}")
        return "native"
    if mode == "always":
        if runner.l1_qemu() is None:
            raise KvmUnusable("HVLAB_NESTED=always but qemu-system-x86_64 is not installed")
        return "nested"
    verdict = kvm_verdict()
    if verdict.usable:
        return "native"
    if mode == "never":
        raise KvmUnusable(f"KVM cannot run stock guests here ({verdict.reason}) and HVLAB_NESTED=never")
    if runner.l1_qemu() is None:
        raise KvmUnusable(f"KVM cannot run stock guests here ({verdict.reason}), and the nested runner "
                          "needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)")
    return "nested"


def reexec_nested_if_needed(argv: list[str], **config) -> int | None:
    """Run this very hvlab command inside the nested runner when KVM here cannot run guests.

    Returns the nested command's exit status, or None when the caller should go on natively.  Call it
    after everything that needs the network (kernel fetches) is done: L1 has no network, but it sees
    hvlab's cache.
    """
    import sys

    from hvlab import progress

    if choose() == "native":
        return None
    from hvlab.nested.runner import NestedConfig, run_nested

    progress.say("KVM here cannot run stock guests: running this command in the nested runner's L1 VM")
    result = run_nested([sys.executable, "-m", "hvlab", *argv], NestedConfig(**config))
    return result.returncode
