"""The virtual switch: ports for each synthetic NIC, VF and test endpoint, with MAC learning and fault hooks.

Frames are plain Ethernet frames without FCS. A port's endpoint hands frames to the switch with
``port.send(frame)`` and receives them through its ``deliver`` callable. The switch is a learning bridge:
it learns source MACs per port, forwards known unicast to one port, and floods broadcast, multicast and
unknown unicast to every other port whose link is up. ``pin()`` adds static entries that beat learning,
which is how the SR-IOV data-path state (synthetic | VF) steers a MAC shared by two ports.

Accounting is exact, because tests measure loss rather than guess it: every frame handed to a port is
either delivered or counted as dropped with a reason, on the port where it was lost:

* ``rx`` (endpoint -> switch) drops, counted on the sending port: "link-down", "runt", "no-such-port"
  (nobody to deliver to, or the port was removed), a hook's reason ("hook" by default);
* ``tx`` (switch -> endpoint) drops, counted on the receiving port: "link-down", "no-such-port", a hook's
  reason, the endpoint's own reason ("ring-full", ...), "deliver-error" when deliver raised.

Flooding and duplicate hooks create frames and delay/reorder hooks hold them for a while, so the
conservation law is ``rx + created == tx + dropped + in_flight`` (see ``Switch.balance()``).

Threading: one lock guards the tables and counters and is never held while calling ``deliver`` (an endpoint
may call ``send`` from inside ``deliver``). Delayed frames are delivered from one timer thread per switch,
started on first use. Hooks have their own lock.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hvlab.net.pcap import PcapWriter
from hvlab.timeline import TimelineSink

log = logging.getLogger("hvlab.net")

Deliver = Callable[[bytes], "str | None"]
"""An endpoint's receive function: called with one Ethernet frame (switch -> endpoint). Returns None when the
endpoint accepted the frame, or a short drop reason ("link-down", "ring-full", "no-rx-buffer", ...) which the
switch counts on that port. May be called from any thread; must not block; the switch holds NO lock while
calling it (so an endpoint may call port.send() from inside deliver without deadlock)."""

ETH_HEADER = 14
RX, TX = "rx", "tx"  # rx: endpoint -> switch; tx: switch -> endpoint (the port's point of view, like counters)
DIRECTIONS = (RX, TX)

#: Drop summaries go to the timeline at most this often per (port, direction, reason).
DROP_SUMMARY_INTERVAL = 1.0

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")


def mac_bytes(mac: str | bytes) -> bytes:
    """"00:15:5d:00:00:02" (or 6 raw bytes) -> 6 bytes; ValueError otherwise."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        return bytes(mac)
    if not _MAC_RE.match(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(x, 16) for x in re.split("[:-]", mac))


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


BROADCAST_MAC = b"\xff" * 6


def is_multicast(mac: bytes) -> bool:
    """True for group addresses (broadcast included): the I/G bit of the first octet."""
    return bool(mac[0] & 1)


# --------------------------------------------------------------------------------------------------
# Counters


@dataclass
class PortCounters:
    """Per-port counters, from the port's point of view (rx: endpoint -> switch, tx: switch -> endpoint).

    ``rx_frames`` counts every frame the endpoint handed over, including those then dropped; ``tx_frames``
    counts only frames the endpoint accepted. ``drops`` holds every drop on this port by reason, in both
    directions; ``rx_dropped``/``tx_dropped`` split the total by direction; ``created`` counts extra copies
    that duplicate hooks on this port made.
    """

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    rx_dropped: int = 0
    tx_dropped: int = 0
    created: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {"rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes, "tx_frames": self.tx_frames,
                "tx_bytes": self.tx_bytes, "drops": dict(self.drops), "rx_dropped": self.rx_dropped,
                "tx_dropped": self.tx_dropped, "created": self.created}


# --------------------------------------------------------------------------------------------------
# Fault hooks


class Verdict(NamedTuple):
    """What a hook did with one frame: frames to pass on (each with an extra delay in seconds), the drop
    reason if the input frame was dropped, and how many frames it created (duplicates)."""

    emit: list[tuple[bytes, float]]
    drop: str | None = None
    created: int = 0


Match = Callable[[bytes], bool]


class Hook:
    """A fault hook on one port and direction.

    ``match`` selects frames (default: all); ``count`` limits the hook to the next N matching frames, after
    which it passes everything. Subclasses implement ``act``; ``matched`` counts frames acted upon.
    """

    reason = "hook"

    def __init__(self, *, match: Match | None = None, count: int | None = None) -> None:
        self.match = match
        self.remaining = count
        self.matched = 0
        self._lock = threading.Lock()

    @property
    def holding(self) -> int:
        """Frames held inside the hook right now (reorder hooks)."""
        return 0

    def process(self, frame: bytes) -> Verdict:
        with self._lock:
            if self.remaining == 0:
                return self.passthrough(frame)
            try:
                hit = self.match is None or bool(self.match(frame))
            except Exception:  # a broken predicate must not break the data path
                log.exception("hook predicate %r failed", self.match)
                hit = False
            if not hit:
                return self.passthrough(frame)
            verdict = self.act(frame)
            if verdict is not None:
                self.matched += 1
                if self.remaining is not None:
                    self.remaining -= 1
                return verdict
            return self.passthrough(frame)

    def passthrough(self, frame: bytes) -> Verdict:
        return Verdict([(frame, 0.0)])

    def act(self, frame: bytes) -> Verdict | None:
        """Act on a matching frame; None means "not this one after all" (e.g. the dice said pass)."""
        raise NotImplementedError

    def release(self) -> list[bytes]:
        """Frames held by the hook, handed back when it is removed."""
        return []


class DropHook(Hook):
    """Drops matching frames, each with ``probability`` (seeded RNG, so runs repeat) or always."""

    def __init__(self, *, match: Match | None = None, count: int | None = None,
                 probability: float | None = None, seed: int = 0, reason: str = "hook") -> None:
        super().__init__(match=match, count=count)
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], not {probability}")
        self.probability = probability
        self.rng = random.Random(seed)
        self.reason = reason

    def act(self, frame: bytes) -> Verdict | None:
        if self.probability is not None and self.rng.random() >= self.probability:
            return None
        return Verdict([], drop=self.reason)


class DelayHook(Hook):
    """Delays matching frames by ``seconds``; frames leave in the order they came (FIFO per hook)."""

    def __init__(self, seconds: float, *, match: Match | None = None, count: int | None = None) -> None:
        super().__init__(match=match, count=count)
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self.seconds = seconds
        self._last_due = 0.0

    def act(self, frame: bytes) -> Verdict:
        now = time.monotonic()
        due = max(now + self.seconds, self._last_due)
        self._last_due = due
        return Verdict([(frame, due - now)])


class DuplicateHook(Hook):
    """Passes matching frames on ``copies + 1`` times (back to back)."""

    def __init__(self, *, copies: int = 1, match: Match | None = None, count: int | None = None) -> None:
        super().__init__(match=match, count=count)
        if copies < 1:
            raise ValueError("copies must be >= 1")
        self.copies = copies

    def act(self, frame: bytes) -> Verdict:
        return Verdict([(frame, 0.0)] * (self.copies + 1), created=self.copies)


class ReorderHook(Hook):
    """Holds each matching frame until ``distance`` later frames (in the same direction) have passed.

    Deterministic reordering: with distance 1, frames A B become B A. Frames still held when the hook is
    removed are released then (``Port.remove_hook``), so nothing is lost.
    """

    def __init__(self, *, distance: int = 1, match: Match | None = None, count: int | None = None) -> None:
        super().__init__(match=match, count=count)
        if distance < 1:
            raise ValueError("distance must be >= 1")
        self.distance = distance
        self._held: list[list[Any]] = []  # [frame, frames still to let pass]

    @property
    def holding(self) -> int:
        return len(self._held)

    def _tick(self, frame: bytes) -> list[tuple[bytes, float]]:
        out: list[tuple[bytes, float]] = [(frame, 0.0)]
        keep = []
        for h in self._held:
            h[1] -= 1
            if h[1] <= 0:
                out.append((h[0], 0.0))
            else:
                keep.append(h)
        self._held = keep
        return out

    def passthrough(self, frame: bytes) -> Verdict:
        return Verdict(self._tick(frame) if self._held else [(frame, 0.0)])

    def act(self, frame: bytes) -> Verdict:
        released = self._tick(frame)[1:]  # the frame itself is held, but it counts for earlier ones
        self._held.append([frame, self.distance])
        return Verdict(released)

    def release(self) -> list[bytes]:
        with self._lock:
            held, self._held = [h[0] for h in self._held], []
        return held


# --------------------------------------------------------------------------------------------------
# Ports


class Port:
    """One switch port: an endpoint's attachment point. Create with ``Switch.add_port``."""

    def __init__(self, switch: Switch, name: str, deliver: Deliver) -> None:
        self.switch = switch
        self.name = name
        self.counters = PortCounters()
        self._deliver = deliver
        self._link_up = True
        self._attached = True
        self._hooks: dict[str, list[Hook]] = {RX: [], TX: []}
        self._pcap: PcapWriter | None = None

    def __repr__(self) -> str:
        return f"<Port {self.switch.name}/{self.name} link={'up' if self._link_up else 'down'}>"

    # -- link and capture -----------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return self._link_up

    @link_up.setter
    def link_up(self, up: bool) -> None:
        up = bool(up)
        with self.switch._lock:
            changed = up != self._link_up
            self._link_up = up
        if changed:
            self.switch._event("switch.link", port=self.name, up=up)

    @property
    def attached(self) -> bool:
        return self._attached

    def set_pcap(self, path: str | os.PathLike[str] | None) -> None:
        """Capture this port's traffic both ways into a new pcap file (None stops capturing).

        Frames from the endpoint are written as handed over, before any hook; frames to the endpoint are
        written once the endpoint accepted them, so the file matches ``rx_frames`` and ``tx_frames``.
        """
        new = PcapWriter(path) if path is not None else None
        old, self._pcap = self._pcap, new
        if old is not None:
            old.close()
        if new is not None:
            self.switch._event("switch.pcap", port=self.name, path=str(new.path))

    @property
    def pcap_path(self) -> str | None:
        return str(self._pcap.path) if self._pcap is not None else None

    # -- hooks ------------------------------------------------------------------------------------

    def add_hook(self, direction: str, hook: Hook) -> Hook:
        """Attach a fault hook to ``direction`` ("rx": from the endpoint, "tx": to the endpoint)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'rx' or 'tx', not {direction!r}")
        with self.switch._lock:
            self._hooks[direction] = [*self._hooks[direction], hook]
        self.switch._event("switch.hook.add", port=self.name, direction=direction, hook=type(hook).__name__)
        return hook

    def remove_hook(self, hook: Hook) -> None:
        """Detach a hook; frames it still holds continue on their way."""
        for direction in DIRECTIONS:
            with self.switch._lock:
                hooks = self._hooks[direction]
                if hook not in hooks:
                    continue
                self._hooks[direction] = [h for h in hooks if h is not hook]
            self.switch._event("switch.hook.remove", port=self.name, direction=direction,
                               hook=type(hook).__name__, matched=hook.matched)
            for frame in hook.release():
                self._after_hooks(direction, frame)
            return

    def clear_hooks(self) -> None:
        for direction in DIRECTIONS:
            for hook in list(self._hooks[direction]):
                self.remove_hook(hook)

    def drop(self, direction: str = RX, *, match: Match | None = None, count: int | None = None,
             probability: float | None = None, seed: int = 0, reason: str = "hook") -> DropHook:
        """Drop frames: all, those ``match`` selects, the next ``count``, or each with ``probability``."""
        return self.add_hook(direction, DropHook(match=match, count=count, probability=probability,
                                                 seed=seed, reason=reason))  # type: ignore[return-value]

    def delay(self, direction: str, seconds: float, *, match: Match | None = None,
              count: int | None = None) -> DelayHook:
        return self.add_hook(direction, DelayHook(seconds, match=match, count=count))  # type: ignore[return-value]

    def duplicate(self, direction: str = RX, *, copies: int = 1, match: Match | None = None,
                  count: int | None = None) -> DuplicateHook:
        return self.add_hook(direction, DuplicateHook(copies=copies, match=match,
                                                      count=count))  # type: ignore[return-value]

    def reorder(self, direction: str = RX, *, distance: int = 1, match: Match | None = None,
                count: int | None = None) -> ReorderHook:
        return self.add_hook(direction, ReorderHook(distance=distance, match=match,
                                                    count=count))  # type: ignore[return-value]

    # -- data path ----------------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Endpoint -> switch. Thread-safe; never raises for a bad frame (it is counted as a drop)."""
        try:
            frame = bytes(frame)
        except Exception:
            frame = b""
        sw = self.switch
        with sw._lock:
            self.counters.rx_frames += 1
            self.counters.rx_bytes += len(frame)
        pcap = self._pcap
        if pcap is not None:
            pcap.write(frame)
        if not self._attached:
            return sw._drop(self, RX, "no-such-port")
        if not self._link_up:
            return sw._drop(self, RX, "link-down")
        if len(frame) < ETH_HEADER:
            return sw._drop(self, RX, "runt")
        hooks = self._hooks[RX]
        if hooks:
            self._run_hooks(RX, hooks, frame)
        else:
            sw._forward(self, frame)

    def _run_hooks(self, direction: str, hooks: list[Hook], frame: bytes) -> None:
        frames: list[tuple[bytes, float]] = [(frame, 0.0)]
        for hook in hooks:
            nxt: list[tuple[bytes, float]] = []
            for f, d in frames:
                v = hook.process(f)
                if v.created:
                    with self.switch._lock:
                        self.counters.created += v.created
                if v.drop is not None:
                    self.switch._drop(self, direction, v.drop)
                nxt.extend((f2, d + d2) for f2, d2 in v.emit)
            frames = nxt
        for f, d in frames:
            if d > 0:
                self.switch._later(d, self, direction, f)
            else:
                self._after_hooks(direction, f)

    def _after_hooks(self, direction: str, frame: bytes) -> None:
        if direction == RX:
            if not self._attached:
                self.switch._drop(self, RX, "no-such-port")
            else:
                self.switch._forward(self, frame)
        else:
            self._deliver_now(frame)

    def _egress(self, frame: bytes) -> None:
        hooks = self._hooks[TX]
        if hooks:
            self._run_hooks(TX, hooks, frame)
        else:
            self._deliver_now(frame)

    def _deliver_now(self, frame: bytes) -> None:
        sw = self.switch
        if not self._attached:
            return sw._drop(self, TX, "no-such-port")
        if not self._link_up:
            return sw._drop(self, TX, "link-down")
        try:
            reason = self._deliver(frame)
        except Exception:
            log.exception("deliver on port %s/%s raised", sw.name, self.name)
            reason = "deliver-error"
        if reason is not None:
            return sw._drop(self, TX, str(reason) or "endpoint")
        with sw._lock:
            self.counters.tx_frames += 1
            self.counters.tx_bytes += len(frame)
        pcap = self._pcap
        if pcap is not None:
            pcap.write(frame)


# --------------------------------------------------------------------------------------------------
# The switch


class _Delayed:
    """A frame waiting in the delay queue, to continue past the hooks of ``direction`` on ``port``."""

    __slots__ = ("port", "direction", "frame")

    def __init__(self, port: Port, direction: str, frame: bytes) -> None:
        self.port, self.direction, self.frame = port, direction, frame

    def __call__(self) -> None:
        self.port._after_hooks(self.direction, self.frame)


class _Timer:
    """One thread delivering delayed frames in deadline order (FIFO for equal deadlines)."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running = 0
        self._name = name

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap) + self._running

    def schedule(self, delay: float, fn: Callable[[], None]) -> bool:
        with self._cond:
            if self._stopping:
                return False
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, fn = heapq.heappop(self._heap)
                        self._running += 1
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            try:
                fn()
            except Exception:
                log.exception("delayed frame callback failed")
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self) -> list[Callable[[], None]]:
        """Stop the thread; returns the callbacks that never ran."""
        with self._cond:
            self._stopping = True
            pending = [fn for _, _, fn in sorted(self._heap)]
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        return pending


class Switch:
    """A learning Ethernet switch (see the module docstring for forwarding, accounting and threading)."""

    def __init__(self, name: str = "sw0", *, timeline: TimelineSink | None = None) -> None:
        self.name = name
        self.timeline = timeline
        self.ports: dict[str, Port] = {}
        self.flood_created = 0  # extra copies made by flooding (one frame to k ports creates k - 1)
        self._lock = threading.Lock()
        self._fdb: dict[bytes, Port] = {}
        self._pins: dict[bytes, Port] = {}
        self._flood_list: tuple[Port, ...] = ()
        self.removed_ports: list[Port] = []  # kept for balance(): their frames still count
        self._timer = _Timer(f"hvlab-switch-{name}")
        self._closed = False
        self._drop_pending: dict[tuple[str, str, str], list[float]] = {}  # key -> [count, last emit]
        self._event("switch.create")

    def __repr__(self) -> str:
        return f"<Switch {self.name} ports={list(self.ports)}>"

    # -- ports ----------------------------------------------------------------------------------

    def add_port(self, name: str, deliver: Deliver) -> Port:
        if not callable(deliver):
            raise TypeError("deliver must be callable")
        with self._lock:
            if name in self.ports:
                raise ValueError(f"switch {self.name} already has a port {name!r}")
            port = Port(self, name, deliver)
            self.ports = {**self.ports, name: port}
            self._flood_list = tuple(self.ports.values())
        self._event("switch.port.add", port=name)
        return port

    def remove_port(self, port: Port) -> None:
        """Detach a port: its learnt MACs and pins go; frames still in flight to it are dropped."""
        with self._lock:
            if self.ports.get(port.name) is not port:
                return
            port._attached = False
            self.ports = {n: p for n, p in self.ports.items() if p is not port}
            self.removed_ports.append(port)
            self._flood_list = tuple(self.ports.values())
            self._fdb = {m: p for m, p in self._fdb.items() if p is not port}
            unpinned = [m for m, p in self._pins.items() if p is port]
            for m in unpinned:
                del self._pins[m]
        port.clear_hooks()  # releases held frames, which are then counted as "no-such-port"
        self._flush_drop_events(port.name)
        self._event("switch.port.remove", port=port.name, counters=port.counters.snapshot(),
                    unpinned=[mac_str(m) for m in unpinned])
        if port._pcap is not None:
            port._pcap.close()

    def port(self, name: str) -> Port:
        return self.ports[name]

    # -- forwarding table -----------------------------------------------------------------------

    def pin(self, mac: str, port: Port | None) -> None:
        """Static forwarding entry that beats MAC learning (None removes it). Used for SR-IOV: the synthetic NIC
        and its VF share one MAC; the data-path state (synthetic | VF) pins the MAC to the port that must receive."""
        m = mac_bytes(mac)
        with self._lock:
            if port is None:
                self._pins.pop(m, None)
            else:
                if self.ports.get(port.name) is not port:
                    raise ValueError(f"{port!r} is not a port of switch {self.name}")
                self._pins[m] = port
        self._event("switch.pin", mac=mac_str(m), port=port.name if port else None)

    def fdb(self) -> dict[str, str]:
        """The learnt table as {mac: port name} (pins not included)."""
        with self._lock:
            return {mac_str(m): p.name for m, p in self._fdb.items()}

    def pins(self) -> dict[str, str]:
        with self._lock:
            return {mac_str(m): p.name for m, p in self._pins.items()}

    def lookup(self, mac: str) -> Port | None:
        """Where a unicast frame to ``mac`` would go now (None: flooded)."""
        m = mac_bytes(mac)
        with self._lock:
            return self._pins.get(m) or self._fdb.get(m)

    # -- data path --------------------------------------------------------------------------------

    def _forward(self, src: Port, frame: bytes) -> None:
        dst, smac = frame[:6], frame[6:12]
        flood = False
        with self._lock:
            if not smac[0] & 1 and src._attached and self._fdb.get(smac) is not src:
                self._fdb[smac] = src
            if dst[0] & 1:
                flood = True
            else:
                target = self._pins.get(dst) or self._fdb.get(dst)
                if target is None:
                    flood = True
                elif target is src:
                    targets: Iterable[Port] = ()
                    reason = "same-port"
                else:
                    targets = (target,)
            if flood:
                targets = [p for p in self._flood_list if p is not src and p._link_up]
                reason = "no-such-port"
                if len(targets) > 1:
                    self.flood_created += len(targets) - 1
        if not targets:
            return self._drop(src, RX, reason)
        for p in targets:
            p._egress(frame)

    def _drop(self, port: Port, direction: str, reason: str) -> None:
        with self._lock:
            c = port.counters
            c.drops[reason] += 1
            if direction == RX:
                c.rx_dropped += 1
            else:
                c.tx_dropped += 1
            if self.timeline is None:
                return
            key = (port.name, direction, reason)
            pend = self._drop_pending.get(key)
            now = time.monotonic()
            if pend is None:
                pend = self._drop_pending[key] = [0, -DROP_SUMMARY_INTERVAL]
            pend[0] += 1
            if now - pend[1] < DROP_SUMMARY_INTERVAL:
                return
            count, pend[0], pend[1] = pend[0], 0, now
            total = c.drops[reason]
        self._event("switch.drop", port=port.name, direction=direction, reason=reason, count=count,
                    total=total)

    def _flush_drop_events(self, port_name: str | None = None) -> None:
        """Emit the drop counts not yet reported (at port removal and close)."""
        with self._lock:
            due = [(k, p[0]) for k, p in self._drop_pending.items()
                   if p[0] and (port_name is None or k[0] == port_name)]
            for k, _ in due:
                self._drop_pending[k][0] = 0
        for (pname, direction, reason), count in due:
            self._event("switch.drop", port=pname, direction=direction, reason=reason, count=count)

    def _later(self, delay: float, port: Port, direction: str, frame: bytes) -> None:
        item = _Delayed(port, direction, frame)
        if not self._timer.schedule(delay, item):
            self._drop(port, direction, "switch-closed")

    def _event(self, kind: str, **fields: Any) -> None:
        if self.timeline is not None:
            self.timeline.event(kind, switch=self.name, **fields)

    # -- accounting and lifetime ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Frames not yet delivered nor dropped: waiting in the delay queue or held by reorder hooks."""
        held = sum(h.holding for p in list(self.ports.values()) for d in DIRECTIONS for h in p._hooks[d])
        return len(self._timer) + held

    def balance(self, ports: Iterable[Port] | None = None) -> dict[str, int]:
        """The terms of ``rx + created == tx + dropped + in_flight`` over all ports ever attached, removed ones
        included (or over ``ports``, which must include every port the frames could reach); ``ok`` says whether
        it holds."""
        ps = [*self.ports.values(), *self.removed_ports] if ports is None else list(ports)
        with self._lock:
            rx = sum(p.counters.rx_frames for p in ps)
            created = sum(p.counters.created for p in ps) + self.flood_created
            tx = sum(p.counters.tx_frames for p in ps)
            dropped = sum(p.counters.rx_dropped + p.counters.tx_dropped for p in ps)
        in_flight = self.in_flight
        return {"rx": rx, "created": created, "tx": tx, "dropped": dropped, "in_flight": in_flight,
                "ok": int(rx + created == tx + dropped + in_flight)}

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until no delayed frame is pending (frames held by reorder hooks are not waited for)."""
        return self._timer.wait_empty(timeout)

    def close(self) -> None:
        """Stop the timer thread and close pcaps. Delayed frames still pending are dropped ("switch-closed")."""
        if self._closed:
            return
        self._closed = True
        pending = self._timer.stop()
        for item in pending:
            if isinstance(item, _Delayed):
                self._drop(item.port, item.direction, "switch-closed")
        self._flush_drop_events()
        for p in list(self.ports.values()):
            if p._pcap is not None:
                p._pcap.close()
        self._event("switch.close", ports={n: p.counters.snapshot() for n, p in self.ports.items()})

    def __enter__(self) -> Switch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
