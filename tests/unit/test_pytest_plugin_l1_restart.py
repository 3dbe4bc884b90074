"""A crashed L1 costs one fresh L1 for the tests it left unfinished, never the whole kvm batch."""

from pathlib import Path
from types import SimpleNamespace

from hvlab import pytest_plugin as plugin


class FakeWriter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str = "", **_markup: object) -> None:
        self.lines.append(text)


def batch(nodeids: list[str]) -> tuple[plugin._NestedBatch, FakeWriter]:
    writer = FakeWriter()
    config = SimpleNamespace(getoption=lambda name: "", get_terminal_writer=lambda: writer)
    # "" for every option: no kernels to fetch, default timeouts
    items = [SimpleNamespace(nodeid=n) for n in nodeids]
    return plugin._NestedBatch(config, items), writer  # type: ignore[arg-type]


def reports(nodeid: str, *phases: str) -> list[dict]:
    return [{"nodeid": nodeid, "when": when, "outcome": "passed"} for when in phases]


def test_tests_an_l1_crash_left_unfinished_run_in_a_fresh_l1(monkeypatch) -> None:
    b, writer = batch(["a", "b", "c"])
    calls: list[list[str]] = []

    def session(workdir: Path, attempt: int, nodeids: list[str], budget: float):
        calls.append(list(nodeids))
        if attempt == 1:  # "a" finished, "b" was running when L1's kernel panicked, "c" never started
            got = {"a": reports("a", "setup", "call", "teardown"), "b": reports("b", "setup")}
            return got, "the nested runner failed: the L1 VM stopped", workdir / "log", False
        return {n: reports(n, "setup", "call", "teardown") for n in nodeids}, None, workdir / "log", False

    monkeypatch.setattr(b, "_session", session)
    b.run()
    assert calls == [["a", "b", "c"], ["b", "c"]]
    assert {n: [d["when"] for d in ds] for n, ds in b.reports.items()} == {
        n: ["setup", "call", "teardown"] for n in "abc"
    }
    assert any("left 2 test(s) unfinished" in line for line in writer.lines)


def test_a_timed_out_l1_is_not_started_again(monkeypatch) -> None:
    b, _ = batch(["a", "b"])
    calls = []

    def session(workdir: Path, attempt: int, nodeids: list[str], budget: float):
        calls.append(attempt)
        return {"a": reports("a", "setup")}, "the nested runner failed: did not finish", workdir / "log", True

    monkeypatch.setattr(b, "_session", session)
    b.run()
    assert calls == [1]
    assert b.failure.startswith("the nested runner failed") and b.reports == {"a": reports("a", "setup")}


def test_a_rerun_attempt_cut_short_is_not_a_finished_test(monkeypatch) -> None:
    """pytest-rerunfailures logs a failed attempt as "rerun" and then its teardown: an L1 that dies in
    the next attempt has not finished that test, so the fresh L1 runs it again."""
    b, _ = batch(["a"])
    first = [*reports("a", "setup"), {"nodeid": "a", "when": "call", "outcome": "rerun"},
             *reports("a", "teardown"), *reports("a", "setup")]
    calls: list[list[str]] = []

    def session(workdir: Path, attempt: int, nodeids: list[str], budget: float):
        calls.append(list(nodeids))
        if attempt == 1:
            return {"a": first}, "the nested runner failed: the L1 VM stopped", workdir / "log", False
        return {"a": reports("a", "setup", "call", "teardown")}, None, workdir / "log", False

    monkeypatch.setattr(b, "_session", session)
    b.run()
    assert calls == [["a"], ["a"]]
    assert [d["when"] for d in b.reports["a"]] == ["setup", "call", "teardown"]


def test_finished_reads_the_last_attempt() -> None:
    rerun = {"nodeid": "a", "when": "call", "outcome": "rerun"}
    assert plugin._finished(reports("a", "setup", "call", "teardown"))
    assert not plugin._finished(reports("a", "setup", "call"))
    assert not plugin._finished([*reports("a", "setup"), rerun, *reports("a", "teardown")])
    assert plugin._finished([*reports("a", "setup"), rerun, *reports("a", "teardown", "setup", "call", "teardown")])
    assert not plugin._finished([])


def test_progress_prints_a_line_per_finished_test(tmp_path: Path) -> None:
    writer = FakeWriter()
    path = tmp_path / "reports.jsonl"
    progress = plugin._Progress(path, 2, writer)
    progress.start()
    lines = [*reports("a", "setup"), {"nodeid": "a", "when": "call", "outcome": "rerun"}, *reports("a", "teardown"),
             *reports("a", "setup", "call", "teardown"), *reports("b", "setup"),
             {"nodeid": "b", "when": "call", "outcome": "failed"}]
    import json
    with open(path, "w") as f:
        f.write("".join(json.dumps(d) + "\n" for d in lines))
        f.write(json.dumps(reports("b", "teardown")[0]))  # no newline yet: a line still being written
        f.flush()
        progress.finish()
    assert writer.lines[0] == "hvlab: L1 a: guest fault, rerunning"
    assert writer.lines[1].startswith("hvlab: L1 [1/2] a passed (")
    assert len(writer.lines) == 2  # b's teardown line was incomplete


def test_each_crash_gets_a_fresh_l1_up_to_the_limit_and_no_more(monkeypatch) -> None:
    """Five L1s at most (an L1 froze twice in a row in one stress round, and each L1 after the first
    runs only what is left, so progress is kept as long as each one finishes a test)."""
    names = ["a", "b", "c", "d", "e", "f"]
    b, _ = batch(names)
    calls: list[list[str]] = []

    def session(workdir: Path, attempt: int, nodeids: list[str], budget: float):
        calls.append(list(nodeids))
        first = nodeids[0]  # each L1 finishes one test, then its kernel stalls
        return {first: reports(first, "setup", "call", "teardown")}, "the L1 VM's kernel reported a stall", \
            workdir / "log", False

    monkeypatch.setattr(b, "_session", session)
    b.run()
    assert plugin.L1_ATTEMPTS == 5
    assert calls == [names[i:] for i in range(5)]
    assert sorted(b.reports) == names[:5]  # f never ran: it fails with the last L1's failure
    assert b.failure is not None and "reported a stall" in b.failure
