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
    items = [SimpleNamespace(nodeid=n) for n in nodeids]
    return plugin._NestedBatch(config, items), writer  # type: ignore[arg-type]


def reports(nodeid: str, *phases: str) -> list[dict]:
    return [{"nodeid": nodeid, "when": when, "outcome": "passed"} for when in phases]


def test_tests_an_l1_crash_left_unfinished_run_in_a_fresh_l1(monkeypatch) -> None:
    b, writer = batch(["a", "b", "c"])
    calls: list[list[str]] = []

    def session(workdir: Path, attempt: int, nodeids: list[str]):
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

    def session(workdir: Path, attempt: int, nodeids: list[str]):
        calls.append(attempt)
        return {"a": reports("a", "setup")}, "the nested runner failed: did not finish", workdir / "log", True

    monkeypatch.setattr(b, "_session", session)
    b.run()
    assert calls == [1]
    assert b.failure.startswith("the nested runner failed") and b.reports == {"a": reports("a", "setup")}
