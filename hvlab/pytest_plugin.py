"""hvlab's pytest plugin: KVM tests run where KVM works, in one shared L1 VM when it must be nested.

Tests marked ``kvm`` need a KVM that runs stock guests.  Where this machine has one they simply run.
Where it does not, the plugin collects every selected ``kvm`` test, starts *one* nested-runner L1 VM
running ``pytest`` on exactly those node ids, and replays that session's reports here, test by test, as
if they had run locally (the way pytest-xdist replays its workers' reports).  One L1 per session keeps
the seconds-long Python start-up inside L1 to a single payment.

Options: ``--hvlab-nested=auto|always|never`` (``never`` skips KVM tests that cannot run natively).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

_REPORT_OPT = "--hvlab-report"


KERNELS = ("6.1", "6.12", "7.3")
"""The kernels every feature is proven on (Debian cloud kernel labels); tests parametrize over them."""

retry_on_guest_fault = pytest.mark.flaky(reruns=2, only_rerun=["GuestPanic", "GuestHang", "GuestTripleFault"])
"""Retry a guest test up to twice, and only when the guest itself failed: its kernel panicked
(GuestPanic), it stopped answering while its VM ran on (GuestHang) or a vCPU triple-faulted
(GuestTripleFault). Under the nested runner the L0 emulator's SVM event injection occasionally
corrupts a guest in one of these three ways (docs/DESIGN.md, "Known issues"; about one test in 15 in a
CI run). Any other failure, or three faults in a row, still fails the test; the terminal summary names
every rerun with the fault that caused it (pytest_terminal_summary below), and a hang leaves ``hang-N.txt`` (where each vCPU was) in
its run directory. Needs pytest-rerunfailures (the ``test`` extra)."""


L1_TIMEOUT = 2400.0
"""Default seconds for all L1 work of a session (--hvlab-l1-timeout)."""
L1_TEST_TIMEOUT = 600.0
"""Default seconds for one kvm test inside L1 (--hvlab-l1-test-timeout)."""
QUIET_MARGIN = 120.0
"""Seconds beyond one test's timeout that an L1 session may go without any report before the runner
ends that L1 as stuck (its tests then run in a fresh one)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hvlab")
    group.addoption("--hvlab-nested", choices=["auto", "always", "never"], default=None,
                    help="run kvm tests through the nested runner: auto (when KVM here cannot), always, never")
    group.addoption(_REPORT_OPT, default=None, help=argparse_suppress())
    group.addoption("--hvlab-kernels", default=",".join(KERNELS),
                    help="kernel labels to fetch before kvm tests run in L1, which has no network "
                         "(default 6.1,6.12,7.3)")
    group.addoption("--hvlab-l1-timeout", type=float, default=L1_TIMEOUT,
                    help="seconds the shared L1 VM(s) may take for all kvm tests together, a restarted L1 "
                         f"included (default {L1_TIMEOUT:.0f})")
    group.addoption("--hvlab-l1-test-timeout", type=float, default=L1_TEST_TIMEOUT,
                    help=f"seconds one kvm test may take inside L1, its reruns included (default {L1_TEST_TIMEOUT:.0f}); "
                         "a test over it fails alone instead of stalling the L1 session")


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a KVM that runs stock guests (native or nested)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    path = config.getoption(_REPORT_OPT)
    if path:
        config.pluginmanager.register(_RemoteReporter(config, Path(path)), "hvlab-remote-reporter")


class _RemoteReporter:
    """Inside L1: write every test report as a JSON line for the host session to replay."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed at session end)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.file.write(json.dumps(data) + "\n")

    def pytest_sessionfinish(self) -> None:
        self.file.close()


L1_ATTEMPTS = 5
"""L1 VMs per session at most: each after the first runs only what a crashed one left unfinished."""


class _NestedBatch:
    """On the host: run all kvm tests in one L1 VM, then replay their reports."""

    def __init__(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        self.config = config
        self.items = items
        self.reports: dict[str, list[dict]] | None = None
        self.failure: str | None = None

    def run(self) -> None:
        """Run the tests in one L1; if that L1 dies or stalls (its own kernel under the L0 emulator),
        run the tests it left unfinished in a fresh L1 (L1_ATTEMPTS in all, within one time budget), so
        one crash does not fail the rest."""
        from hvlab.errors import HvlabError
        from hvlab.guest import kernels

        for label in filter(None, self.config.getoption("--hvlab-kernels").split(",")):
            try:
                kernels.fetch(label.strip())
            except HvlabError as exc:
                self.config.get_terminal_writer().line(f"hvlab: could not fetch kernel {label}: {exc}")

        workdir = Path(tempfile.mkdtemp(prefix="hvlab-pytest-"))
        tw = self.config.get_terminal_writer()
        self.reports = {}
        todo = [item.nodeid for item in self.items]
        deadline = time.monotonic() + float(self.config.getoption("--hvlab-l1-timeout") or L1_TIMEOUT)
        for attempt in range(1, L1_ATTEMPTS + 1):
            budget = deadline - time.monotonic()
            reports, failure, log_file, timed_out = self._session(workdir, attempt, todo, budget)
            finished = {n for n, datas in reports.items() if _finished(datas)}
            # a second L1 gets what time is left; after a timeout none is (it would only time out again)
            last = attempt == L1_ATTEMPTS or timed_out or deadline - time.monotonic() < 120
            self.reports.update({n: d for n, d in reports.items() if n in finished or last})
            todo = [n for n in todo if n not in finished]
            if not todo:
                return
            tail = log_file.read_text(errors="replace").splitlines()[-40:] if log_file.exists() else []
            output = "the L1 pytest session's last output:\n" + "\n".join(tail)
            if failure is None:
                failure = "the L1 pytest session ended without reporting this test"
            failure = f"{failure}\n{output}"
            self.failure = failure
            if last:
                return
            tw.line(f"hvlab: L1 attempt {attempt} left {len(todo)} test(s) unfinished "
                    f"({failure.splitlines()[0]}); running them in a fresh L1 VM", yellow=True)

    def _session(
        self, workdir: Path, attempt: int, nodeids: list[str], budget: float
    ) -> tuple[dict[str, list[dict]], str | None, Path, bool]:
        """One L1 VM running ``nodeids``: their reports by node id, why the VM failed (None if it did
        not), its log, and whether it was killed for running out of time."""
        from hvlab.errors import HvlabError
        from hvlab.nested.runner import NestedConfig, NestedTimeout, run_nested

        report_file = workdir / f"reports-{attempt}.jsonl"
        log_file = workdir / f"l1-pytest-{attempt}.log"
        (workdir / f"nodeids-{attempt}").write_text("\n".join(nodeids) + "\n")
        rootdir = str(self.config.rootpath)
        test_timeout = float(self.config.getoption("--hvlab-l1-test-timeout") or L1_TEST_TIMEOUT)
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--color=no", "-o", "addopts=",
                "-o", f"timeout={test_timeout:.0f}", "--rootdir", rootdir, _REPORT_OPT, str(report_file), *nodeids]
        tw = self.config.get_terminal_writer()
        tw.line()
        tw.line(f"hvlab: running {len(nodeids)} kvm test(s) in one nested-runner L1 VM, at most {budget:.0f} s "
                f"(log: {log_file})", bold=True)
        failure, timed_out = None, False
        old = os.getcwd()
        progress = _Progress(report_file, len(nodeids), tw)
        progress.start()
        try:
            os.chdir(rootdir)
            with open(log_file, "w") as log:
                # L1 pytest writes a report line at every phase of every test, so a report file that stops
                # growing well past one test's own timeout means the session is stuck beyond its reach
                nested = NestedConfig(timeout=budget, writable=[workdir], activity=[report_file],
                                      quiet_timeout=test_timeout + QUIET_MARGIN)
                result = run_nested(argv, nested, stdout=log, stderr=log)
            tw.line(f"hvlab: L1 session finished in {result.seconds:.0f} s (exit {result.returncode})")
        except HvlabError as exc:
            failure, timed_out = f"the nested runner failed: {exc}", isinstance(exc, NestedTimeout)
            tw.line(f"hvlab: {failure}", red=True)
        finally:
            os.chdir(old)
            progress.finish()
        reports: dict[str, list[dict]] = {}
        if report_file.exists():
            for line in report_file.read_text().splitlines():
                data = json.loads(line)
                reports.setdefault(data["nodeid"], []).append(data)
        return reports, failure, log_file, timed_out

    def run_guarded(self) -> None:
        """``run``, with any error turned into a failure of the kvm tests rather than of the session."""
        try:
            self.run()
        except Exception as exc:  # noqa: BLE001 (reported per test below, never an INTERNALERROR)
            self.failure = f"the nested batch failed: {type(exc).__name__}: {exc}"
            if self.reports is None:
                self.reports = {}

    def replay(self, item: pytest.Item) -> None:
        if self.reports is None:
            self.run_guarded()
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        datas = self.reports.get(item.nodeid, []) if self.reports is not None else []
        if datas:
            for data in datas:
                report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
                ihook.pytest_runtest_logreport(report=report)
        else:
            report = pytest.TestReport(item.nodeid, item.location, {}, "failed",
                                       self.failure or "no report from the L1 session", "call", [])
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _finished(datas: list[dict]) -> bool:
    """Whether a test's reports end in a final attempt: a teardown after an attempt that was not a
    rerun (pytest-rerunfailures logs a failed attempt as outcome "rerun", then its teardown)."""
    rerun = False
    for data in datas:
        if data.get("when") == "setup":
            rerun = False
        rerun = rerun or data.get("outcome") == "rerun"
    return bool(datas) and datas[-1].get("when") == "teardown" and not rerun


class _Progress(threading.Thread):
    """Print a line per kvm test as L1 finishes it (its reports file grows line by line over 9p), so a
    long L1 session shows where it is in a CI log rather than staying silent until it ends."""

    def __init__(self, path: Path, total: int, tw) -> None:
        super().__init__(daemon=True)
        self.path, self.total, self.tw = path, total, tw
        self.stop = threading.Event()
        self.done = 0
        self.t0 = time.monotonic()

    def run(self) -> None:
        from hvlab.nested.runner import GrowingFile

        reports, seen = GrowingFile(self.path), {}
        while True:
            stopping = self.stop.is_set()
            for line in reports.new_lines():
                self._report(line, seen)
            if stopping:
                return
            self.stop.wait(1.0)

    def _report(self, line: bytes, seen: dict[str, list[dict]]) -> None:
        try:
            data = json.loads(line)
        except ValueError:
            return
        nodeid = data.get("nodeid", "?")
        datas = seen.setdefault(nodeid, [])
        if data.get("when") == "setup":
            datas.clear()  # a new attempt
        datas.append(data)
        if data.get("outcome") == "rerun":
            self.tw.line(f"hvlab: L1 {nodeid}: guest fault, rerunning")
        elif _finished(datas):
            outcome = next((d["outcome"] for d in datas if d.get("outcome") != "passed"), "passed")
            self.done += 1
            self.tw.line(f"hvlab: L1 [{self.done}/{self.total}] {nodeid} {outcome} "
                         f"({time.monotonic() - self.t0:.0f} s)")

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=5)


_batch_key = pytest.StashKey[_NestedBatch]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Run the L1 batch before any test, outside every test's own timeout (pytest-timeout's alarm covers
    one test's protocol; a whole L1 session inside it was killed at 900 s in CI)."""
    batch = session.config.stash.get(_batch_key, None)
    if batch is None or session.config.option.collectonly or batch.reports is not None:
        return
    batch.run_guarded()


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the guest fault behind every rerun (pytest-rerunfailures lists only the test ids), so a
    green run still shows which platform faults it absorbed, with a hang's vCPU report."""
    reruns = terminalreporter.stats.get("rerun", [])
    if not reruns:
        return
    terminalreporter.write_sep("=", f"hvlab: {len(reruns)} rerun(s) after a guest fault", yellow=True)
    for report in reruns:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(report.longrepr).strip().splitlines()[-1:]
        lines = str(message).splitlines()
        terminalreporter.write_line(f"{report.nodeid}: {lines[0] if lines else '?'}")
        for line in lines[1:12]:
            terminalreporter.write_line(f"    {line}")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so L1 runs only the selected tests
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_items = [i for i in items if i.get_closest_marker("kvm")]
    if not kvm_items or config.getoption(_REPORT_OPT):
        return
    from hvlab.nested import runner

    if runner.in_l1():
        return
    mode = config.getoption("--hvlab-nested") or os.environ.get("HVLAB_NESTED", "auto")
    if mode == "always":
        where = "nested" if runner.l1_qemu() else "none"
        reason = "HVLAB_NESTED=always but qemu-system-x86_64 is missing"
    else:
        from hvlab import placement

        verdict = placement.kvm_verdict()
        if verdict.usable:
            return
        reason = f"KVM cannot run stock guests here ({verdict.reason})"
        where = "nested" if mode == "auto" and runner.l1_qemu() else "none"
    if where == "none":
        state = "disabled" if mode == "never" else "unavailable"
        skip = pytest.mark.skip(reason=f"{reason}; the nested runner is {state}")
        for item in kvm_items:
            item.add_marker(skip)
        return
    config.stash[_batch_key] = _NestedBatch(config, kvm_items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    batch = item.config.stash.get(_batch_key, None)
    if batch is None or item not in batch.items:
        return None
    batch.replay(item)
    # A replayed item is neither set up nor torn down here, so tear down what the previous real item
    # left set up and the next item does not need (e.g. a module fixture of tests/e2e before tests/unit),
    # as pytest's own runtestprotocol does; otherwise the next setup fails "not torn down properly".
    item.session._setupstate.teardown_exact(nextitem)
    return True


@pytest.fixture
def hvlab_guest():
    """Factory: ``vm = hvlab_guest("6.12", smp=2)`` boots a guest and waits for its agent; every guest
    booted through it is powered off at teardown.  Only for ``kvm``-marked tests."""
    from hvlab.guest import kernels
    from hvlab.vmm.guestvm import GuestVM, GuestVMConfig

    vms = []

    def boot(kernel: str = "6.12", **options):
        k = kernels.resolve(kernel, fetch_missing=False)
        vm = GuestVM(GuestVMConfig(kernel=k, **options))
        vms.append(vm)
        vm.wait_ready()
        return vm

    yield boot
    for vm in vms:
        try:
            vm.shutdown(timeout=5)
        finally:
            vm.close()
