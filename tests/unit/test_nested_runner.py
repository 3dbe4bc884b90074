"""The nested runner's command script carries the command, cwd and environment exactly."""

import subprocess

import pytest

from hvlab.nested.runner import (
    L1_ALIVE,
    L1_STARTED,
    NestedConfig,
    _ask_for_task_dumps,
    _command_script,
    _watch,
)


def test_command_script_quotes_and_filters_env(tmp_path):
    script = _command_script(["python3", "-c", "import sys; print(sys.argv, 'a b')", "x'y"], str(tmp_path),
                             {"PATH": "/usr/bin:/bin", "HVLAB_CACHE": "/c", "SSH_AUTH_SOCK": "/secret",
                              "PYTHONPATH": "/p q"})
    assert "SSH_AUTH_SOCK" not in script
    assert "export HVLAB_IN_L1=1" in script
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["-c", "x'y"]) + " a b"


def test_command_script_exit_status(tmp_path):
    script = _command_script(["sh", "-c", "exit 7"], str(tmp_path), {"PATH": "/usr/bin:/bin"})
    assert subprocess.run(["sh", "-c", script]).returncode == 7


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "30"])


@pytest.mark.parametrize(("console_text", "timeout", "kind"), [
    (b"[    0.000000] Linux version 6.12\n", 30.0, "boot"),  # never started the command: killed early
    (b"boot\n" + L1_STARTED + b"\n", 1.5, "timeout"),  # started, then ran out of time
])
def test_watch_says_why_an_l1_must_be_killed(tmp_path, console_text, timeout, kind):
    console = tmp_path / "console.log"
    console.write_bytes(console_text)
    proc = _sleeper()
    try:
        verdict = _watch(proc, console, NestedConfig(timeout=timeout, start_timeout=1))
        assert verdict is not None and verdict.kind == kind
    finally:
        proc.kill()


def test_watch_returns_when_qemu_exits(tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"")
    proc = subprocess.Popen(["true"])
    assert _watch(proc, console, NestedConfig(timeout=30, start_timeout=10)) is None


@pytest.mark.parametrize("line", [
    b"[  296.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    b"[  400.0] INFO: task python3:513 blocked for more than 122 seconds.",
    b"[  12.5] Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
])
def test_watch_gives_up_on_an_l1_whose_kernel_reports_trouble(tmp_path, line):
    """An L1 CPU stuck in kernel mode strands whatever L1 task was queued there (pytest's own timeout
    included), and an oops may kill a task holding KVM's or 9p's locks, so the runner ends that L1 as
    soon as its kernel says so, not at the session's timeout."""
    console = tmp_path / "console.log"
    console.write_bytes(L1_STARTED + b"\n")
    proc = _sleeper()
    try:
        with open(console, "ab") as f:
            f.write(line + b"\n[  296.2] rcu: \t0-...0: (1 GP")
        verdict = _watch(proc, console, NestedConfig(timeout=30, start_timeout=1))
        assert verdict is not None and verdict.kind == "kernel"
        assert line.decode() in verdict.detail
    finally:
        proc.kill()


def _beat(console, stop, every=0.2):
    import time

    while not stop.is_set():
        with open(console, "ab") as f:
            f.write(L1_ALIVE + b" 12.34\n")
        time.sleep(every)


def test_watch_ends_an_l1_whose_heartbeat_stops(tmp_path):
    """Every L1 CPU stuck: nothing is printed at all, so only the heartbeat's absence tells."""
    console = tmp_path / "console.log"
    console.write_bytes(L1_STARTED + b"\n" + L1_ALIVE + b" 1.0\n")
    proc = _sleeper()
    try:
        verdict = _watch(proc, console, NestedConfig(timeout=30, start_timeout=1, heartbeat_timeout=1.5))
        assert verdict is not None and verdict.kind == "silent"
    finally:
        proc.kill()


def test_watch_keeps_an_l1_that_beats_and_ends_one_whose_command_is_stuck(tmp_path):
    """A live L1 (heartbeat on) whose command's output and activity files stop growing is stuck past
    its own timeouts: "quiet", and only once growth stops (it grows for the first 2 s here)."""
    import threading
    import time

    console = tmp_path / "console.log"
    console.write_bytes(L1_STARTED + b"\n")
    reports = tmp_path / "reports.jsonl"
    reports.touch()
    stop = threading.Event()
    beats = threading.Thread(target=_beat, args=(console, stop), daemon=True)
    beats.start()

    def grow():
        for _ in range(8):
            with open(reports, "a") as f:
                f.write("{}\n")
            time.sleep(0.25)

    grower = threading.Thread(target=grow, daemon=True)
    grower.start()
    proc = _sleeper()
    t0 = time.monotonic()
    try:
        verdict = _watch(proc, console, NestedConfig(timeout=30, start_timeout=1, heartbeat_timeout=1.0,
                                                     quiet_timeout=1.5), [reports])
        assert verdict is not None and verdict.kind == "quiet", verdict
        assert time.monotonic() - t0 > 2.0 + 1.5 - 0.5
    finally:
        stop.set()
        proc.kill()


def test_task_dump_request_waits_for_l1_to_take_it(tmp_path):
    """The host leaves the SysRq letters in the exchange directory; l1-init's loop takes the file."""
    import threading
    import time

    taken = []

    def l1():
        request = tmp_path / "sysrq"
        while not request.exists():
            time.sleep(0.05)
        taken.append(request.read_text().split())
        request.unlink()

    threading.Thread(target=l1, daemon=True).start()
    _ask_for_task_dumps(tmp_path, wait=5)
    assert taken == [["w", "l"]]
    assert not (tmp_path / "sysrq").exists()


def test_l1_init_heartbeat_loop_carries_out_the_request():
    """l1-init's loop: the marker the watch looks for, and the request file it honours."""
    from hvlab.nested.runner import FILES, SYSRQ_DUMPS

    init = (FILES / "l1-init").read_text()
    assert f'say "{L1_ALIVE.decode().removeprefix("hvlab-l1: ")}' in init
    assert "/xchg/sysrq" in init and "/proc/sysrq-trigger" in init
    assert set(SYSRQ_DUMPS.split()) <= set("wlt")
