"""What a Linux kernel's console says when it is in trouble, for the VMM (an L2 guest's ttyS0) and the
nested runner (L1's own console) alike."""

from __future__ import annotations

from pathlib import Path

PANIC_MARK = b"Kernel panic - not syncing"

STALL_MARKS = ("detected stalls on CPUs", "self-detected stall on CPU", "BUG: soft lockup",
               "blocked for more than")
"""Lines by which a kernel says one of its CPUs stopped making progress (RCU stall warnings, the
soft-lockup watchdog) or a task has waited uninterruptibly for minutes (the hung-task detector: an L1
whose CPU never left a stuck L2 showed only that, for its pytest process blocked in KVM).  The kernel
still runs, but whatever waits on that CPU or task waits forever."""


OOPS_MARKS = ("Oops:", "general protection fault", "BUG: unable to handle", "kernel BUG at")
"""Lines by which a kernel says it killed a task for a fault in kernel code.  In L1 that task may have
held a lock KVM or 9p needs, or been the test session itself: the nested runner treats it as fatal (an
L2 guest's oops is the test's business)."""


def first_line(text: str, marks: tuple[str, ...]) -> str | None:
    """The first line of ``text`` containing one of ``marks``, stripped, or None."""
    for line in text.splitlines():
        if any(mark in line for mark in marks):
            return line.strip()
    return None


def stall_line(text: str) -> str | None:
    """The first line of ``text`` that reports a stalled CPU or a hung task, or None."""
    return first_line(text, STALL_MARKS)


def console_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a console log, for an error message (a missing log says so)."""
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no console log)"
