"""L1's QEMU monitor (HMP over a unix socket): where L1's CPUs are when the L1 has gone silent.

Why: an L1 whose every CPU is stuck prints nothing (no CPU is left to run a watchdog), and the nested
runner can only kill it.  Before it does, QEMU itself can still say where each L1 CPU was; with L1's
System.map (L1 boots ``nokaslr``) that is a function name the failure message carries into a CI log.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hvlab.system_map import SystemMap

PROMPT = b"(qemu) "
_ESCAPE = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def hmp(path: Path, command: str, timeout: float = 10.0) -> str:
    """Run one HMP command on the monitor socket at ``path``; its output (prompt and echo removed).

    Raises OSError (TimeoutError included) when QEMU does not answer: a QEMU wedged in its own lock is one
    of the things this is for, so callers treat that as an answer too."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))

        def until_prompt() -> bytes:
            data = b""
            while not data.endswith(PROMPT):
                s.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("QEMU closed its monitor")
                data += chunk
            return data

        until_prompt()  # the banner
        s.sendall(command.encode() + b"\n")
        out = _ESCAPE.sub(b"", until_prompt()[: -len(PROMPT)]).decode(errors="replace")
    lines = out.replace("\r", "").split("\n")
    if lines and command in lines[0]:
        lines = lines[1:]  # the echo
    return "\n".join(lines).strip()


@dataclass(frozen=True)
class CpuState:
    index: int
    rip: int
    cpl: int | None
    halted: bool | None
    interrupts: bool | None = None
    """RFLAGS.IF: a CPU halted with interrupts on waits for one; with them off, forever."""

    def describe(self, symbols: SystemMap | None) -> str:
        where = symbols.lookup(self.rip) if symbols is not None else None
        if where is None:
            where = ("user space" if self.cpl == 3 else
                     "outside L1's kernel text (a module, or an L2 guest this CPU was running)")
        state = " halted" if self.halted else ""
        cpl = f" CPL{self.cpl}" if self.cpl is not None else ""
        flag = "" if self.interrupts is None else f" IF={int(self.interrupts)}"
        return f"CPU {self.index}: RIP {self.rip:#x} {where}{cpl}{flag}{state}"


_CPU = re.compile(r"^CPU#(\d+)", re.M)


def parse_registers(text: str) -> list[CpuState]:
    """The CPUs in ``info registers -a`` output: a ``CPU#n`` header, then ``RIP=... CPL=n ... HLT=n``."""
    heads = list(_CPU.finditer(text))
    cpus = []
    for i, head in enumerate(heads):
        block = text[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        rip = re.search(r"\b[RE]IP=([0-9a-fA-F]+)", block)  # EIP outside long mode
        if rip is None:
            continue
        cpl = re.search(r"\bCPL=(\d)", block)
        hlt = re.search(r"\bHLT=(\d)", block)
        rfl = re.search(r"\b[RE]FL=([0-9a-fA-F]+)", block)
        cpus.append(CpuState(int(head.group(1)), int(rip.group(1), 16),
                             int(cpl.group(1)) if cpl else None, hlt.group(1) == "1" if hlt else None,
                             bool(int(rfl.group(1), 16) & 0x200) if rfl else None))
    return cpus


def lapic_summary(text: str) -> str:
    """One line from ``info lapic N``: the timer (mode, vector, mask, counts), IRR, ISR, TPR and PPR.
    A halted CPU with interrupts on and nothing in IRR waits for a timer; whether that timer counts
    down between two samples says whether it will ever come."""
    def field(pattern: str) -> str | None:
        m = re.search(pattern, text, re.M)
        return m.group(1).strip() if m else None

    lvtt = field(r"^LVTT\s+0x[0-9a-f]+\s+(.*)$")
    timer = field(r"^Timer\s+(.*)$")
    irr, isr = field(r"^IRR\s+(.*)$"), field(r"^ISR\s+(.*)$")
    prio = field(r"^(APR .*)$")
    parts = [f"LVTT {' '.join(lvtt.split())}" if lvtt else None, f"timer {timer}" if timer else None,
             f"IRR {irr}" if irr else None, f"ISR {isr}" if isr else None, prio]
    return "; ".join(p for p in parts if p) or "no LAPIC state"


def cpu_report(path: Path, symbols: SystemMap | None, out: Path, timeout: float = 10.0) -> list[str]:
    """Ask QEMU twice, a second apart, where every CPU is and what its local APIC holds: lines per CPU
    and sample (a CPU at the same place twice is stuck there, one that moved is looping; a timer whose
    count did not move will never fire), the raw output saved to ``out``.
    A QEMU that does not answer is reported as such."""
    lines, raw = [], []
    for sample in (1, 2):
        try:
            text = hmp(path, "info registers -a", timeout)
        except OSError as exc:
            return [*lines, f"QEMU's monitor did not answer ({type(exc).__name__}: {exc}): QEMU itself is stuck"]
        raw.append(f"# sample {sample}\n{text}\n")
        for cpu in parse_registers(text):
            lines.append(f"sample {sample}: {cpu.describe(symbols)}")
            try:
                lapic = hmp(path, f"info lapic {cpu.index}", timeout)
            except OSError:
                continue
            raw.append(f"# sample {sample}, info lapic {cpu.index}\n{lapic}\n")
            lines.append(f"sample {sample}: CPU {cpu.index} LAPIC: {lapic_summary(lapic)}")
        if sample == 1:
            time.sleep(1.0)
    out.write_text("".join(raw))
    return lines
