"""The nested runner's command script carries the command, cwd and environment exactly."""

import subprocess

from hvlab.nested.runner import _command_script


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
