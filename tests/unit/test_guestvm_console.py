"""The guest console: lines reach the timeline, and a stall warning is caught however the bytes arrive."""

from pathlib import Path

from hvlab.vmm.guestvm import Console

STALL = b"[  109.757441] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\r\n"


class Timeline:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def event(self, kind: str, line: str) -> None:
        self.lines.append(line)


def test_a_stall_warning_is_caught_byte_by_byte(tmp_path: Path) -> None:
    timeline = Timeline()
    console = Console(tmp_path / "console.log", timeline=timeline)
    for byte in b"[    1.0] hv_vmbus: registering driver hv_netvsc\r\n" + STALL + b"[  109.79] rcu: \t1-...0: (68 ticks)\n":
        console.write(bytes([byte]))
    console.close()
    assert console.stall == "[  109.757441] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
    assert timeline.lines[0] == "[    1.0] hv_vmbus: registering driver hv_netvsc"
    assert len(timeline.lines) == 3
    assert (tmp_path / "console.log").read_bytes().count(b"\n") == 3


def test_soft_lockups_count_and_ordinary_lines_do_not(tmp_path: Path) -> None:
    console = Console(tmp_path / "console.log")  # no timeline: stalls are still caught
    console.write(b"[   3.1] rcu: Hierarchical RCU implementation.\n[   4.0] hv_netvsc: VF slot 1 added\n")
    assert console.stall is None
    console.write(b"[  50.2] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [modprobe:123]\n")
    console.write(STALL)
    assert console.stall == "[  50.2] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [modprobe:123]"
    console.close()


def test_a_hung_task_report_counts_as_a_stall(tmp_path: Path) -> None:
    console = Console(tmp_path / "console.log")
    console.write(b"[  489.200138] INFO: task python3:513 blocked for more than 124 seconds.\n")
    assert console.stall == "[  489.200138] INFO: task python3:513 blocked for more than 124 seconds."
    console.close()
