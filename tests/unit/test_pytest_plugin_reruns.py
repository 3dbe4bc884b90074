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


SLOW_L1_CONFTEST = """
import time
from hvlab import pytest_plugin
from hvlab.nested import runner

runner.l1_qemu = lambda: object()  # "a nested runner exists"


def _session(self, workdir, attempt, nodeids, budget):
    time.sleep(3)  # longer than the 1 s per-test timeout below: the L1 session is not one test's time
    return ({n: [{"nodeid": n, "when": w, "outcome": "passed", "location": ["test_kvm.py", 0, n],
                  "longrepr": None, "sections": [], "keywords": {}, "duration": 0.0, "user_properties": [],
                  "$report_type": "TestReport"} for w in ("setup", "call", "teardown")] for n in nodeids},
            None, workdir / "log", False)


pytest_plugin._NestedBatch._session = _session
"""

KVM_TESTS = """
import pytest

@pytest.mark.kvm
def test_one():
    raise AssertionError("replayed, never run here")

@pytest.mark.kvm
def test_two():
    raise AssertionError("replayed, never run here")

def test_local():
    pass
"""


def test_the_l1_session_runs_outside_any_test_timeout(pytester: pytest.Pytester) -> None:
    """CI once killed the whole L1 session at pytest-timeout's 900 s because it ran inside the first kvm
    test's protocol; it runs before the test loop now, and its tests are replayed."""
    pytester.makeconftest(SLOW_L1_CONFTEST)
    pytester.makepyfile(test_kvm=KVM_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hvlab-nested=always", "--hvlab-kernels=",
                                           "-o", "timeout=1")
    result.assert_outcomes(passed=3)
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
