"""The nested runner: KVM works inside L1 where it does not on the bare host."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvlab.kvm.probe import run_probe
from hvlab.nested import runner


@pytest.mark.kvm
def test_probe_passes_where_kvm_tests_run():
    result = run_probe()
    assert result.usable, result.reason
    assert result.steps_done == 5


@pytest.mark.kvm
def test_dev_kvm_opens():
    fd = os.open("/dev/kvm", os.O_RDWR)
    os.close(fd)


@pytest.mark.kvm
@pytest.mark.skipif(not runner.in_l1(), reason="checks the nested runner's L1 kernel")
def test_l1_runs_kvm_with_nested_paging_on_the_tsc():
    """L1's KVM uses nested paging (shadow paging under TCG could not boot a guest in 300 s), and the
    TSC stays L1's clocksource (tsc=reliable; the HPET fallback made every clock read an MMIO exit)."""
    params = {name: Path(f"/sys/module/kvm_amd/parameters/{name}").read_text().strip() for name in ("nested", "npt")}
    assert params == {"nested": "1", "npt": "Y"}
    assert Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip() == "tsc"


@pytest.mark.slow
@pytest.mark.skipif(runner.in_l1() or runner.l1_qemu() is None, reason="needs the host side with QEMU")
def test_hvlab_exec_hands_back_output_and_status(tmp_path):
    script = "import os, sys; os.open('/dev/kvm', os.O_RDWR); print('kvm ok'); print('to-err', file=sys.stderr); sys.exit(7)"
    proc = subprocess.run([sys.executable, "-m", "hvlab", "exec", "--nested", "--mem", "1024", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "kvm ok\n"
    assert "to-err" in proc.stderr


def _freeze_when_running(result: dict, after: float = 10.0) -> None:
    """Stop every L1 CPU through QEMU's monitor once the command runs, as a wedged L0 emulator would."""
    import glob
    import time

    from hvlab.nested.monitor import hmp

    t0 = time.time()
    while time.time() - t0 < 300:
        for d in map(Path, glob.glob(f"{result['dir']}/hvlab-l1-*")):
            if runner.L1_STARTED in (d / "console.log").read_bytes():
                time.sleep(after)
                hmp(d / "monitor.sock", "stop")
                result["frozen"] = True
                return
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.skipif(runner.in_l1() or runner.l1_qemu() is None, reason="needs the host side with QEMU")
def test_an_l1_that_goes_silent_is_killed_with_where_its_cpus_were(tmp_path):
    """Every L1 CPU stuck prints nothing at all (the official CI once waited 39 min on such an L1):
    the heartbeat's absence ends it, and QEMU's monitor says where its CPUs were, by function name."""
    import threading

    from hvlab.errors import HvlabError

    state = {"dir": str(tmp_path)}
    threading.Thread(target=_freeze_when_running, args=(state,), daemon=True).start()
    config = runner.NestedConfig(memory_mb=1024, timeout=600, heartbeat_timeout=30, keep_dir=tmp_path)
    with pytest.raises(HvlabError) as exc:
        runner.run_nested(["sleep", "500"], config, stdout=io.BytesIO(), stderr=io.BytesIO())
    assert state.get("frozen")
    text = str(exc.value)
    assert "went silent" in text and not isinstance(exc.value, runner.NestedTimeout)
    cpus = [line for line in text.splitlines() if line.strip().startswith("sample ") and " RIP " in line]
    assert len(cpus) == 4, text
    lapics = [line for line in text.splitlines() if " LAPIC: " in line]
    assert len(lapics) == 4 and all("LVTT" in line and "timer" in line for line in lapics), text
    # a frozen idle L1: both CPUs in L1's kernel, named (kallsyms saved by the first L1 on this machine)
    assert all("RIP 0xffffffff" in line and "+0x" in line for line in cpus), text


@pytest.mark.slow
@pytest.mark.skipif(runner.in_l1() or runner.l1_qemu() is None, reason="needs the host side with QEMU")
def test_an_l1_whose_command_is_stuck_is_killed_with_its_task_dumps(tmp_path):
    """L1 alive but its command past every timeout: the command's silence ends it, after L1 printed
    its blocked tasks and CPU backtraces (magic SysRq, asked for through the exchange directory)."""
    from hvlab.errors import HvlabError

    config = runner.NestedConfig(memory_mb=1024, timeout=600, quiet_timeout=20, keep_dir=tmp_path)
    with pytest.raises(HvlabError) as exc:
        runner.run_nested(["sh", "-c", "echo started; sleep 500"], config,
                          stdout=io.BytesIO(), stderr=io.BytesIO())
    assert "made no progress for" in str(exc.value)
    console = next(tmp_path.glob("hvlab-l1-*/console.log")).read_text(errors="replace")
    assert "sysrq: Show Blocked State" in console, console[-3000:]
    assert "NMI backtrace for cpu" in console or "sysrq: Show backtrace of all active CPUs" in console
