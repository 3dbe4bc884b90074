"""The server's support pieces: the event loop (threaded and manual), the JSON-lines timeline, and
the heartbeat running on a real loop thread against the guest model."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from hvlab.devices.ic import HeartbeatDevice
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.timeline import MemoryTimeline, Timeline, read_timeline
from hvlab.vmbus.loop import EventLoop, ManualLoop
from hvlab.vmbus.testing import EchoDevice, HvUtilsModel, make_bus


def test_manual_loop_orders_and_cancels() -> None:
    loop = ManualLoop()
    seen: list[str] = []
    loop.schedule(2.0, lambda: seen.append("b"))
    loop.schedule(1.0, lambda: seen.append("a"))
    loop.schedule(1.0, lambda: seen.append("a2"))
    dropped = loop.schedule(1.5, lambda: seen.append("never"))
    dropped.cancel()

    def chain() -> None:
        seen.append("chain")
        loop.schedule(0.5, lambda: seen.append(f"chained@{loop.now}"))

    loop.schedule(2.5, chain)
    assert loop.pending == 4
    loop.advance(1.0)
    assert seen == ["a", "a2"]
    loop.advance(5.0)
    assert seen == ["a", "a2", "b", "chain", "chained@3.0"] and loop.now == 6.0 and loop.pending == 0


def test_manual_loop_survives_failing_callbacks() -> None:
    loop = ManualLoop()
    seen: list[int] = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(lambda: seen.append(1))
    assert loop.run_pending() == 2 and seen == [1]


def test_event_loop_thread_runs_under_the_lock() -> None:
    lock = threading.RLock()
    done = threading.Event()
    held: list[bool] = []
    order: list[int] = []
    with EventLoop(lock) as loop:
        assert loop.running
        loop.schedule(0.02, lambda: order.append(2))
        loop.schedule(0.0, lambda: order.append(1))
        cancelled = loop.schedule(0.01, lambda: order.append(99))
        cancelled.cancel()

        def check() -> None:
            held.append(lock._is_owned())  # type: ignore[attr-defined]
            done.set()

        loop.schedule(0.03, check)
        assert done.wait(5.0)
    assert held == [True] and order == [1, 2] and not loop.running


def test_timeline_file_is_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with Timeline(path) as timeline:
        timeline.event("vmbus.tx", msgtype="OFFERCHANNEL", if_type=vm.ClassGuid.NETVSC, raw=b"\x01\x02")
        threads = [threading.Thread(target=lambda i=i: timeline.event("x", i=i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    timeline.event("after.close")  # ignored, never raises
    events = read_timeline(path)
    assert events[0]["kind"] == "timeline.start" and "wall_clock" in events[0]
    assert events[1] == {
        "t": events[1]["t"],
        "kind": "vmbus.tx",
        "msgtype": "OFFERCHANNEL",
        "if_type": str(vm.ClassGuid.NETVSC),
        "raw": "0102",
    }
    assert sorted(e["i"] for e in events[2:]) == list(range(8))
    assert all(b["t"] >= a["t"] for a, b in zip(events, events[1:]))
    stream = io.StringIO()
    Timeline(stream).event("k", v=1)
    assert json.loads(stream.getvalue().splitlines()[1])["v"] == 1


def test_server_writes_a_readable_timeline(tmp_path: Path) -> None:
    path = tmp_path / "bus.jsonl"
    timeline = Timeline(path)
    bus = make_bus([HeartbeatDevice(scheduler=ManualLoop())], timeline=timeline)
    bus.connect()
    bus.guest.open_channel(1)
    timeline.close()
    kinds = [e["kind"] for e in read_timeline(path)]
    assert kinds.count("vmbus.rx") == 4 and kinds.count("vmbus.tx") == 5 and "vmbus.channel" in kinds


def test_heartbeat_on_a_real_loop_thread() -> None:
    """The production arrangement: timers on the loop thread under the server lock, the guest elsewhere."""
    timeline = MemoryTimeline()
    bus = make_bus([], timeline=timeline)
    loop = EventLoop(bus.server.lock)
    hb = HeartbeatDevice(scheduler=loop, interval=0.01)
    bus.server.add_device(hb)
    bus.connect()
    model = HvUtilsModel(bus.guest.open_channel(1, send_pages=4, recv_pages=4), "heartbeat")
    with loop:
        deadline = time.monotonic() + 5.0
        while hb.beats < 5 and time.monotonic() < deadline:
            with bus.server.lock:
                bus.run(rounds=2)
            time.sleep(0.005)
    assert hb.beats >= 5 and model.negotiated is not None
    replies = [r.reply for r in hb.history]
    assert replies == sorted(replies) and all(r.ok for r in hb.history)


def test_backstop_recovers_a_lost_eom_and_a_lost_signal() -> None:
    loop = ManualLoop()
    bus = make_bus([EchoDevice("00000000-0000-4000-8000-000000000401")], eager=False)
    bus.server.install_backstop(loop, interval=0.1)
    bus.guest.connect()
    bus.guest.post(vm.MsgType.REQUESTOFFERS)
    assert bus.server.pending_messages() == 1
    slot = bus.synic.slot(0)
    bus.guest.on_message(bytes(slot))  # the guest took the offer and freed the slot, but no EOM came
    slot[0:4] = bytes(4)
    loop.advance(0.1)
    assert bus.server.pending_messages() == 0
    bus.synic.eager = True
    bus.synic.pump()
    bus.guest.poll()
    ch = bus.guest.open_channel(1)
    dev = bus.server.devices[0]
    assert isinstance(dev, EchoDevice)
    dev.echo = False
    assert ch.outbound is not None
    ch.outbound.write(vp.build_inband(b"no doorbell"))  # written without HvSignalEvent
    loop.advance(0.1)
    assert dev.packets[-1].payload.startswith(b"no doorbell")
    snap = bus.server.snapshot()
    assert snap["version"] == "5.3" and snap["channels"][0]["packets_in"] == 1
    json.dumps(snap)
