"""The nested runner: KVM works inside L1 where it does not on the bare host."""

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
