"""Decide whether KVM here can run stock x86-64 guests, by running a tiny 64-bit probe guest.

Module names and capability bits do not answer this: kvm_pvm (the "PVM" hypervisor on our machines)
provides /dev/kvm and answers every capability query, yet a stock Debian kernel dies in its instruction
emulator on SHLX, CMPXCHG16B, XSAVE/XRSTOR or INT3.  So the probe sets up long mode with paging, a GDT and
an IDT, and executes exactly those instructions, reporting each step on port 0x80.  Its source is
``probe.S`` beside this file (``as probe.S -o p.o && objcopy -O binary p.o p.bin``).

Run it in a child process (``python -m hvlab.kvm.probe``) so that a guest that hangs or a KVM that
misbehaves cannot take the caller down: ``run_probe()`` does that with a timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

CODE = bytes.fromhex(
    "b001e680b801000000b904000000c4e2f1f7d84883fb107564b002e680488d3d6c00000031c031d2bb05000000b906"
    "000000f0480fc70f754448833f05753eb003e6800f20e0480d000604000f22e031c9b80300000031d20f01d1488d3d"
    "5e000000b80300000031d20fae270fae2fb004e680ccb005e680b04fe681f4b0eee681f4b033e68248cf0f1f84000000"
    "00000000000000000000000000000000000066662e0f1f84000000000066662e0f1f840000000000662e0f1f84000000"
    "0000"
)
HANDLER_OFFSET = 0x82

STEPS = {
    0: "enter 64-bit mode with paging",
    1: "SHLX (BMI2)",
    2: "CMPXCHG16B",
    3: "XSETBV/XSAVE/XRSTOR",
    4: "INT3 through the IDT and IRETQ",
    5: "report the verdict",
}

CODE_GPA = 0x1000
GDT_GPA = 0x500
IDT_GPA = 0x600
PML4_GPA = 0x10000
STACK_TOP = 0x9000
MEM_SIZE = 2 << 20


@dataclass
class ProbeResult:
    usable: bool
    reason: str
    steps_done: int = 0
    exits: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _seg(selector: int, code: bool):
    from hvlab.kvm import abi

    return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1,
                           dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def _probe_in_process() -> ProbeResult:
    """Run the probe guest in this process.  May hang on a broken KVM: prefer ``run_probe``."""
    import struct

    from hvlab.errors import KvmUnusable
    from hvlab.kvm import abi
    from hvlab.kvm.memory import GuestMemory
    from hvlab.kvm.system import Kvm, KvmError

    try:
        kvm = Kvm()
    except KvmUnusable as exc:
        return ProbeResult(False, str(exc))
    try:
        vm = kvm.create_vm()
        mem = GuestMemory([(0, MEM_SIZE)], name="hvlab-probe")
        vm.set_memory(mem)
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid(kvm.supported_cpuid())
    except KvmError as exc:
        return ProbeResult(False, f"setting up a VM failed: {exc}")

    mem.write(CODE_GPA, CODE)
    # identity map of the first 1 GiB with 2 MiB pages
    mem.write(PML4_GPA, struct.pack("<Q", (PML4_GPA + 0x1000) | 3))
    mem.write(PML4_GPA + 0x1000, struct.pack("<Q", (PML4_GPA + 0x2000) | 3))
    mem.write(PML4_GPA + 0x2000, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    mem.write(GDT_GPA, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    handler = CODE_GPA + HANDLER_OFFSET
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x08, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)
    mem.write(IDT_GPA + 3 * 16, gate)

    sregs = vcpu.get_sregs()
    sregs.cs = _seg(0x08, code=True)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _seg(0x10, code=False)
    sregs.tr = abi.kvm_segment(base=0, limit=0x67, selector=0x18, type=11, present=1, s=0)
    sregs.gdt = abi.kvm_dtable(base=GDT_GPA, limit=3 * 8 - 1)
    sregs.idt = abi.kvm_dtable(base=IDT_GPA, limit=256 * 16 - 1)
    sregs.cr0 = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
    sregs.cr3 = PML4_GPA
    sregs.cr4 = 0x20  # PAE
    sregs.efer = 0x500  # LME | LMA
    regs = abi.kvm_regs(rip=CODE_GPA, rsp=STACK_TOP, rflags=2)
    try:
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
    except KvmError as exc:
        return ProbeResult(False, f"setting up 64-bit mode failed: {exc}")

    step = 0
    handler_ran = False
    for exits in range(1, 100):
        try:
            reason = vcpu.run()
        except KvmError as exc:
            return ProbeResult(False, f"KVM_RUN failed during '{STEPS[step]}': {exc}", step, exits)
        run = vcpu.run_struct
        if reason == abi.KVM_EXIT_IO and run.exit.io.direction == abi.KVM_EXIT_IO_OUT:
            port, value = run.exit.io.port, vcpu.io_data()[0]
            if port == 0x80:
                step = value
            elif port == 0x82:
                handler_ran = True
            elif port == 0x81:
                if value == 0x4F and handler_ran:
                    return ProbeResult(True, "a 64-bit guest ran SHLX, CMPXCHG16B, XSAVE/XRSTOR and INT3",
                                       step, exits)
                return ProbeResult(False, f"the probe guest computed a wrong result after '{STEPS[step]}'",
                                   step, exits)
            continue
        name = abi.EXIT_NAMES.get(reason, str(reason))
        detail = ""
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {run.exit.internal.suberror}: instruction emulation failed)" \
                if run.exit.internal.suberror == 1 else f" (suberror {run.exit.internal.suberror})"
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            detail = " (triple fault)"
        failing = STEPS.get(step + 1 if step < 5 else step, "?") if step or reason != abi.KVM_EXIT_SHUTDOWN \
            else STEPS[0]
        return ProbeResult(False, f"the guest stopped with a '{name}' exit{detail} at '{failing}'", step, exits)
    return ProbeResult(False, "the probe guest did not finish in 100 exits", step, 100)


def run_probe(timeout: float = 20.0) -> ProbeResult:
    """Run the probe in a child process; a hang or crash there is a verdict, not our failure."""
    try:
        proc = subprocess.run([sys.executable, "-m", "hvlab.kvm.probe"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"the probe guest hung for {timeout:.0f} s")
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    try:
        return ProbeResult(**json.loads(last[0]))
    except (ValueError, TypeError):
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult(False, f"the probe process died (exit {proc.returncode}): {err}")


if __name__ == "__main__":
    print(_probe_in_process().to_json(), flush=True)
