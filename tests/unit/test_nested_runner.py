"""The nested runner's command script carries the command, cwd and environment exactly."""

import subprocess

import pytest

from hvlab.nested.runner import L1_STARTED, NestedConfig, _command_script, _watch


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


@pytest.mark.parametrize(("console_text", "timeout", "why"), [
    (b"[    0.000000] Linux version 6.12\n", 30.0, "boot"),  # never started the command: killed early
    (b"boot\n" + L1_STARTED + b"\n", 1.5, "timeout"),  # started, then ran out of time
])
def test_watch_says_why_an_l1_must_be_killed(tmp_path, console_text, timeout, why):
    console = tmp_path / "console.log"
    console.write_bytes(console_text)
    proc = _sleeper()
    try:
        assert _watch(proc, console, NestedConfig(timeout=timeout, start_timeout=1)) == why
    finally:
        proc.kill()


def test_watch_returns_when_qemu_exits(tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"")
    proc = subprocess.Popen(["true"])
    assert _watch(proc, console, NestedConfig(timeout=30, start_timeout=10)) is None


def test_watch_gives_up_on_an_l1_whose_kernel_reports_a_stall(tmp_path):
    """An L1 CPU stuck in kernel mode strands whatever L1 task was queued there (pytest's own timeout
    included), so the runner ends that L1 as soon as its kernel says so, not at the session's timeout."""
    console = tmp_path / "console.log"
    console.write_bytes(L1_STARTED + b"\n")
    proc = _sleeper()
    try:
        with open(console, "ab") as f:
            f.write(b"[  296.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n[  296.2] rcu: \t0-...0: (1 GP")
        assert _watch(proc, console, NestedConfig(timeout=30, start_timeout=1)) == (
            "[  296.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:")
    finally:
        proc.kill()
