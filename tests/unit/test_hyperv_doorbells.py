"""Doorbells: the set of ioeventfds follows the live connection ids, and a rung eventfd reaches the
server as handle_signal_event(conn_id). KVM is replaced by a recorder; the eventfds are real."""

import os
import threading

import pytest

from hvlab.hyperv.doorbells import Doorbells
from hvlab.hyperv.hypercall import FAST_PORT


class FakeVm:
    def __init__(self, fail_for: int | None = None) -> None:
        self.assigned: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.fail_for = fail_for

    def ioeventfd(self, fd, addr, length, *, pio, datamatch=None, deassign=False):
        self.calls.append((addr, length, pio, datamatch, deassign))
        if datamatch == self.fail_for:
            raise OSError(28, "No space left on device")
        if deassign:
            assert self.assigned.pop(datamatch) == fd
        else:
            assert datamatch not in self.assigned
            self.assigned[datamatch] = fd


@pytest.fixture
def bells():
    got: list[int] = []
    cond = threading.Condition()

    def on_signal(conn):
        with cond:
            got.append(conn)
            cond.notify_all()

    vm = FakeVm(fail_for=0x10099)
    d = Doorbells(vm, on_signal)
    yield d, vm, got, cond
    d.close()


def wait_for(cond, pred, timeout=5.0):
    with cond:
        assert cond.wait_for(pred, timeout), "timed out"


def test_update_tracks_ids_and_dispatches(bells):
    d, vm, got, cond = bells
    d.update([0x10001, 0x10002])
    assert set(vm.assigned) == {0x10001, 0x10002}
    assert all(c[0] == FAST_PORT and c[1] == 4 and c[2] for c in vm.calls)
    os.eventfd_write(vm.assigned[0x10002], 1)
    wait_for(cond, lambda: got == [0x10002])
    d.update([0x10001])  # channel 2 gone: its ioeventfd is deassigned, the fd closed
    assert set(vm.assigned) == {0x10001}
    assert vm.calls[-1][3:] == (0x10002, True)
    os.eventfd_write(vm.assigned[0x10001], 3)  # KVM adds up several signals in one counter
    wait_for(cond, lambda: got == [0x10002, 0x10001])
    assert d.signals == 2


def test_failed_registration_falls_back_quietly(bells):
    d, vm, got, cond = bells
    d.update([0x10001, 0x10099])
    assert d.connection_ids == {0x10001}


def test_handler_exception_does_not_stop_other_doorbells():
    got = []
    ev = threading.Event()

    def on_signal(conn):
        if conn == 1:
            raise RuntimeError("device bug")
        got.append(conn)
        ev.set()

    vm = FakeVm()
    d = Doorbells(vm, on_signal)
    try:
        d.update([1, 2])
        os.eventfd_write(vm.assigned[1], 1)
        os.eventfd_write(vm.assigned[2], 1)
        assert ev.wait(5)
        assert got == [2]
    finally:
        d.close()
    assert vm.assigned == {}
