"""``hvlab doctor``: what can run here, and how hvlab will run it."""

from __future__ import annotations

import argparse
import os
import subprocess

from hvlab.cli import add_command

DESCRIPTION = """\
Check this machine and say how hvlab will run guests here.

Checks, in order: whether /dev/kvm exists and opens; whether it can run stock x86-64 guests, decided by
running a tiny 64-bit probe guest that executes instructions a real kernel needs (SHLX, CMPXCHG16B,
XSAVE/XRSTOR, INT3 through an IDT) -- some KVMs, such as kvm_pvm, provide /dev/kvm but cannot; whether
the nested runner can be used (qemu-system-x86_64 present); which kernels are cached.  The last line
is the verdict.
"""

EPILOG = """\
exit status:
  0  KVM here runs stock guests: hvlab runs its VMM directly
  1  KVM here cannot, but the nested runner can be used: hvlab runs its VMM inside an L1 VM
  3  neither: install qemu-system-x86 (Debian) or use a machine with KVM

options:
  --nested-check also boots the L1 VM and runs the probe inside it (takes about half a minute)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "doctor", help="say whether and how KVM guests can run here",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--nested-check", action="store_true",
                   help="also start the L1 VM and run the probe guest inside it")
    p.set_defaults(func=run)


def _kvm_module() -> str:
    try:
        mods = set(os.listdir("/sys/module"))
    except OSError:
        return "unknown"
    found = [m for m in ("kvm_pvm", "kvm_intel", "kvm_amd", "kvm") if m in mods]
    return ", ".join(found) if found else "none listed in /proc/modules (built in?)"


def _qemu_version(qemu) -> str:
    """``qemu`` is a hvlab.nested.runner.L1Qemu."""
    try:
        out = subprocess.run([*qemu.command, "--version"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, **qemu.env}).stdout
        return out.splitlines()[0] if out else "unknown version"
    except (OSError, subprocess.TimeoutExpired):
        return "does not run"


def run(args: argparse.Namespace) -> int:
    from hvlab import placement
    from hvlab.nested import runner

    def line(label: str, text: str) -> None:
        print(f"{label:<22} {text}")

    exists = os.path.exists("/dev/kvm")
    line("/dev/kvm", "present" if exists else "absent")
    if exists:
        line("KVM modules", _kvm_module())
    if runner.in_l1():
        line("context", "inside the nested runner's L1 VM")
    verdict = placement.kvm_verdict(refresh=True)
    line("probe guest", ("PASS: " if verdict.usable else "FAIL: ") + verdict.reason)
    l1 = runner.l1_qemu()
    line("nested runner", f"available ({l1.label}, TCG {l1.tcg_thread}-threaded: {_qemu_version(l1)})"
         if l1 else "unavailable: no QEMU (hvlab qemu --prepare, or apt-get install qemu-system-x86)")
    try:
        from hvlab.guest import kernels

        cached = kernels.list_cached()
        line("cached kernels", ", ".join(f"{k.label} ({k.release})" for k in cached) if cached
             else "none (hvlab kernel fetch 6.12)")
    except ImportError:
        pass

    if verdict.usable:
        print("verdict: KVM here runs stock guests; hvlab runs its VMM directly on /dev/kvm")
        return 0
    if l1 is None:
        print("verdict: no usable KVM and no nested runner; hvlab cannot run guests here")
        return 3
    if args.nested_check and not runner.in_l1():
        import sys

        from hvlab.nested.runner import NestedConfig, run_nested

        result = run_nested([sys.executable, "-m", "hvlab.kvm.probe"], NestedConfig(memory_mb=1024, timeout=600))
        line("probe inside L1", f"exit {result.returncode} after {result.seconds:.1f} s")
    print("verdict: KVM here cannot run stock guests; hvlab runs its VMM inside an L1 VM (nested runner)")
    return 1
