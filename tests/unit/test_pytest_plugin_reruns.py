"""The e2e rerun policy: only guest faults rerun, at most twice, and the summary names each fault."""

import pytest

pytest_plugins = ["pytester"]

FLAKY = '''
import os
from hvlab.pytest_plugin import retry_on_guest_fault
from hvlab.vmm.guestvm import GuestHang, GuestTripleFault

def _attempt(name):
    path = os.path.join(os.path.dirname(__file__), name)
    n = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(n + 1))
    return n

@retry_on_guest_fault
def test_hang_once():
    if _attempt("hang") == 0:
        raise GuestHang("no answer to 'true' within 40 s\\nvCPU 1: in KVM_RUN for 41.0 s; rip 0xffffffff81e3a1b0")

@retry_on_guest_fault
def test_triple_fault_every_time():
    _attempt("tf")
    raise GuestTripleFault("the guest triple-faulted: vCPU 0 shut down")

@retry_on_guest_fault
def test_plain_failure():
    _attempt("plain")
    assert False, "a real bug"
'''


def test_guest_faults_rerun_and_are_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_flaky=FLAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")  # hvlab.pytest_plugin loads by entry point
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("rerun")) == (1, 2, 3), outcomes
    attempts = {name: int((pytester.path / name).read_text()) for name in ("hang", "tf", "plain")}
    assert attempts == {"hang": 2, "tf": 3, "plain": 1}
    result.stdout.fnmatch_lines([
        "*hvlab: 3 rerun(s) after a guest fault*",
        "*test_hang_once: hvlab.vmm.guestvm.GuestHang: no answer to 'true' within 40 s",
        "    vCPU 1: in KVM_RUN for 41.0 s; rip 0xffffffff81e3a1b0",
    ])
