"""The vmxnet3 NIC as a vfio-user device model: the VF that netvsc's transparent SR-IOV logic pairs with.

Why vmxnet3: a flat register file, two version registers, a handful of commands and one descriptor
format (HOST_CONTRACT.md §5.1), and Linux's driver is in every cloud kernel.

What the guest sees: BAR0 (interrupt masks, doorbells), BAR1 (version, shared-area address, commands,
MAC, cause registers), BAR2 (MSI-X table and PBA, served by the vfio-user layer). Everything else is
guest memory reached by DMA: the "driver shared" area, the queue descriptor table and the rings, whose
ownership is decided by generation bits. Frames the guest transmits go to ``port.send``; frames the
switch delivers (``deliver``) go into rx ring 1 (plus ring 2 body buffers for long frames).

Guest input is untrusted: a bad address, ring size or descriptor is a logged violation naming the queue
and field; the queue stops with an error code (reported through GET_QUEUE_STATUS and an event interrupt,
as the hardware does) and the server carries on.

Threading: BAR accesses run on the vfio-user server's loop thread; ``deliver`` may come from any thread
(the switch's). One re-entrant lock guards the device state; DMA into mmap-backed guest memory is safe
from any thread (see hvlab.vfio_user.device). QEMU's guest RAM is a shared memfd, so that is the normal
case; with fd-less guest memory a deliver() from another thread waits for the loop thread's DMA round
trip (bounded by the server's DMA timeout).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from hvlab.net.frames import insert_vlan
from hvlab.net.switch import BROADCAST_MAC, mac_bytes
from hvlab.protocol import vmxnet3 as V
from hvlab.vf import offload
from hvlab.vfio_user.device import DmaError, PciDevice
from hvlab.vfio_user.pci import Bar, MsiCap, MsixCap, PcieCap

log = logging.getLogger("hvlab.vf.vmxnet3")

MSIX_VECTORS = V.MAX_INTRS
MAX_REVISION = 4  # highest vmxnet3 revision this model implements (no v6 queue config, no v7 capabilities)


class PortLike(Protocol):
    """What the device needs of a switch port (hvlab.net.switch.Port satisfies it)."""

    def send(self, frame: bytes) -> None: ...


class GuestStateError(Exception):
    """Malformed guest state: ``field`` names what was wrong (for the violation log)."""

    def __init__(self, where: str, field: str, detail: str, code: int = V.ERR_TXD_INVALID) -> None:
        super().__init__(f"{where}: {field}: {detail}")
        self.where, self.field, self.detail, self.code = where, field, detail, code


@dataclass
class Ring:
    """Device-side cursor over a descriptor ring in guest memory."""

    base: int = 0
    size: int = 0
    idx: int = 0
    gen: int = V.INIT_GEN

    def addr(self, i: int | None = None) -> int:
        return self.base + V.DESC_SIZE * (self.idx if i is None else i)

    def advance(self) -> None:
        self.idx += 1
        if self.idx == self.size:
            self.idx = 0
            self.gen ^= 1


@dataclass
class TxQueue:
    qid: int
    desc_pa: int
    ring: Ring
    comp: Ring
    intr: int
    stopped: bool = False
    error: int = 0
    stats: Counter[str] = field(default_factory=Counter)


@dataclass
class RxQueue:
    qid: int
    desc_pa: int
    rings: tuple[Ring, Ring]
    comp: Ring
    intr: int
    stopped: bool = False
    error: int = 0
    stats: Counter[str] = field(default_factory=Counter)


_OK_KEYS = {
    (d, kind): (f"{kind}Pkts{d}OK", f"{kind}Bytes{d}OK", f"{d.lower()}_frames", f"{d.lower()}_bytes")
    for d in ("Tx", "Rx") for kind in ("ucast", "mcast", "bcast")
}
"""(direction, cast) -> the UPT1 packet and byte counter names and the device's frame and byte totals."""


class Vmxnet3(PciDevice):
    """A vmxnet3 function. ``msix=False`` offers MSI only (needed for QEMU 11.1.3 hot-unplug)."""

    vendor_id = V.VENDOR_ID
    device_id = V.DEVICE_ID
    subsystem_vendor_id = V.VENDOR_ID
    subsystem_id = V.DEVICE_ID
    class_code = V.CLASS_ETHERNET
    revision = 1
    bars = {0: Bar(V.PT_REG_SIZE), 1: Bar(V.VD_REG_SIZE), 2: Bar(0x2000)}  # noqa: RUF012
    msi = MsiCap(vectors=1)
    msix = MsixCap(vectors=MSIX_VECTORS, table_bar=2, table_offset=0, pba_bar=2, pba_offset=0x1000)
    pcie = PcieCap()

    def __init__(self, mac: str | bytes, *, port: PortLike | None = None, msix: bool = True,
                 max_revision: int = 3, name: str = "vmxnet3") -> None:
        if not 1 <= max_revision <= MAX_REVISION:
            raise ValueError(f"max_revision must be 1..{MAX_REVISION}")
        # MSI only: no MSI-X capability and no BAR2 to hold its table.
        super().__init__(**({} if msix else {"msix": None, "bars": {0: self.bars[0], 1: self.bars[1]}}))
        self.name = name
        self.perm_mac = mac_bytes(mac)
        self.port = port
        self.max_revision = max_revision
        self.lock = threading.RLock()
        self.link_up = True
        self.violations: deque[str] = deque(maxlen=1000)  # the latest; counters["violations"] counts all
        self._violation_keys: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()  # device-level totals (tx/rx frames, drops by reason)
        self._power_on()

    # ============================================================ state
    def _power_on(self) -> None:
        self.mac = self.perm_mac
        self.revision_selected = 0
        self.upt_selected = 0
        self.dsa = 0
        self.last_cmd = 0
        self.cmd_result = 0
        self.ecr = 0
        self.icr = 0
        self.imr = [True] * V.MAX_INTRS  # masked until the driver enables its vectors
        self.pending = [False] * V.MAX_INTRS
        self._deactivate()

    def _deactivate(self) -> None:
        self.active = False
        self.txq: list[TxQueue] = []
        self.rxq: list[RxQueue] = []
        self.num_intrs = 1
        self.event_intr = 0
        self.auto_mask = False
        self.upt_features = 0
        self.rx_mode = 0
        self.mcast: set[bytes] = set()
        self.vlan_table = bytes(512)

    def reset(self) -> None:
        """PCI-level reset (vfio-user DEVICE_RESET): back to power-on, link state kept."""
        with self.lock:
            self._power_on()

    def connected(self) -> None:
        """A new client (QEMU connects anew on every device_add) finds a power-on function: config space,
        registers and rings are reset; MAC, link state and counters are the NIC's and stay."""
        with self.lock:
            self.handle_reset()

    def disconnected(self) -> None:
        """The client left and took guest memory with it: stop the rings, keep MAC, link and counters."""
        with self.lock:
            self._deactivate()

    def attach(self, port: PortLike | None) -> None:
        """Connect the device to a switch port (its ``deliver`` must be this device's ``deliver``)."""
        self.port = port

    # ============================================================ helpers
    def _violation(self, where: str, field: str, detail: str) -> None:
        msg = f"{self.name} {where}: {field}: {detail}"
        key = f"{where}: {field}"
        self._violation_keys[key] += 1
        n = self._violation_keys[key]
        if n <= 20 or n % 1000 == 0:  # a guest repeating itself must not flood the log
            log.warning("protocol violation: %s%s", msg, f" ({n} so far)" if n > 1 else "")
        self.violations.append(msg)
        self.counters["violations"] += 1

    def _read(self, where: str, field: str, gpa: int, n: int) -> bytes:
        try:
            return self.dma_read(gpa, n)
        except DmaError as e:
            raise GuestStateError(where, field, f"cannot read {n} bytes at {gpa:#x}: {e.strerror or e}") from None

    def _write(self, where: str, field: str, gpa: int, data: bytes) -> None:
        try:
            self.dma_write(gpa, data)
        except DmaError as e:
            raise GuestStateError(where, field, f"cannot write {len(data)} bytes at {gpa:#x}: "
                                                f"{e.strerror or e}") from None

    def _shared(self, field: str, offset: int, n: int) -> bytes:
        if not self.dsa:
            raise GuestStateError("shared", "DSAL/DSAH", "driver-shared address not set")
        return self._read("shared", field, self.dsa + offset, n)

    # ============================================================ interrupts
    def raise_intr(self, idx: int) -> None:
        """Raise vmxnet3 interrupt ``idx`` (tx/rx queue or event), honouring IMR and auto-mask."""
        with self.lock:
            if not 0 <= idx < V.MAX_INTRS:
                return
            if self.imr[idx]:
                self.pending[idx] = True
                return
            self.pending[idx] = False
            if self.auto_mask:
                self.imr[idx] = True
            msix_on, _ = self.config.msix_state()
            if not msix_on:
                msi_on, _ = self.config.msi_state()
                if not msi_on:
                    self.icr |= 1
            self.counters["interrupts"] += 1
        self.irq(idx if msix_on else 0)

    def _set_imr(self, idx: int, masked: bool) -> None:
        self.imr[idx] = masked
        if not masked and self.pending[idx]:
            self.raise_intr(idx)

    def _post_event(self, bits: int) -> None:
        """Set event cause bits in the shared area and raise the event interrupt."""
        self.ecr |= bits
        if self.dsa and self.active:
            try:
                cur = struct.unpack("<I", self._shared("ecr", V.ECR_OFFSET, 4))[0]
                self._write("shared", "ecr", self.dsa + V.ECR_OFFSET, struct.pack("<I", cur | bits))
            except GuestStateError as e:
                self._violation(e.where, e.field, e.detail)
                return
            self.raise_intr(self.event_intr)

    def set_link(self, up: bool) -> None:
        """Change the link state; an active driver gets an ECR link event and re-reads GET_LINK."""
        with self.lock:
            if up == self.link_up:
                return
            self.link_up = up
            log.info("%s: link %s", self.name, "up" if up else "down")
            self._post_event(V.ECR_LINK)

    # ============================================================ BARs
    def bar_read(self, bar: int, offset: int, size: int) -> bytes | int:
        with self.lock:
            if bar == 0:
                reg, i = offset & ~7, (offset & 0xFFF) // 8
                if reg < V.Bar0.TXPROD and i < V.MAX_INTRS:
                    return int(self.imr[i])
                return 0
            if bar != 1:
                return 0
            return self._vd_read(offset & ~7) >> (8 * (offset & 7)) if offset & 7 < 4 else 0

    def _vd_read(self, reg: int) -> int:
        if reg == V.Bar1.VRRS:
            return (1 << self.max_revision) - 1
        if reg == V.Bar1.UVRS:
            return 1
        if reg == V.Bar1.DSAL:
            return self.dsa & 0xFFFFFFFF
        if reg == V.Bar1.DSAH:
            return self.dsa >> 32
        if reg == V.Bar1.CMD:
            return self.cmd_result
        if reg == V.Bar1.MACL:
            return int.from_bytes(self.mac[:4], "little")
        if reg == V.Bar1.MACH:
            return int.from_bytes(self.mac[4:], "little")
        if reg == V.Bar1.ICR:
            icr, self.icr = self.icr, 0
            if icr:
                self.intx_deassert()
            return icr
        if reg == V.Bar1.ECR:
            return self.ecr
        return 0

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if offset & 7 or len(data) not in (4, 8):
            self._violation(f"BAR{bar}", f"offset {offset:#x}", f"{len(data)}-byte access; registers are "
                                                               "32-bit at 8-byte spacing")
            return
        value = int.from_bytes(data[:4], "little")
        with self.lock:
            if bar == 0:
                self._pt_write(offset, value)
            elif bar == 1:
                self._vd_write(offset, value)

    def _pt_write(self, offset: int, value: int) -> None:
        if offset < V.Bar0.TXPROD:
            i = offset // 8
            if i < V.MAX_INTRS:
                self._set_imr(i, bool(value & 1))
            return
        if offset < V.Bar0.RXPROD:
            q = (offset - V.Bar0.TXPROD) // 8
            if q >= len(self.txq):
                if self.active:
                    self._violation("TXPROD", f"queue {q}", f"doorbell for a queue that does not exist "
                                                            f"({len(self.txq)} configured)")
                return
            if value >= self.txq[q].ring.size:
                self._violation(f"txq{q}", "TXPROD", f"producer index {value} outside the "
                                                     f"{self.txq[q].ring.size}-entry ring (ignored; ownership "
                                                     "is by generation bit)")
            self.process_tx(q)
        # RXPROD/RXPROD2: ownership is by generation bit; nothing to do (updateRxProd stays 0).

    def _vd_write(self, offset: int, value: int) -> None:
        if offset == V.Bar1.VRRS:
            if value.bit_count() != 1 or value >= 1 << self.max_revision:
                self._violation("VRRS", "value", f"{value:#x} does not select one offered revision")
            else:
                self.revision_selected = value.bit_length()
        elif offset == V.Bar1.UVRS:
            if value != 1:
                self._violation("UVRS", "value", f"{value:#x}: only UPT version 1 is offered")
            self.upt_selected = value & 1
        elif offset == V.Bar1.DSAL:
            self.dsa = (self.dsa & ~0xFFFFFFFF) | value
        elif offset == V.Bar1.DSAH:
            self.dsa = (self.dsa & 0xFFFFFFFF) | value << 32
        elif offset == V.Bar1.CMD:
            self.command(value)
        elif offset == V.Bar1.MACL:
            self.mac = value.to_bytes(4, "little") + self.mac[4:]
        elif offset == V.Bar1.MACH:
            self.mac = self.mac[:4] + (value & 0xFFFF).to_bytes(2, "little")
        elif offset == V.Bar1.ECR:
            self.ecr &= ~value
            if self.dsa:
                try:
                    cur = struct.unpack("<I", self._shared("ecr", V.ECR_OFFSET, 4))[0]
                    self._write("shared", "ecr", self.dsa + V.ECR_OFFSET, struct.pack("<I", cur & ~value))
                except GuestStateError as e:
                    self._violation(e.where, e.field, e.detail)
        else:
            self._violation("BAR1", f"offset {offset:#x}", "write to a register that does not exist")

    # ============================================================ commands
    def command(self, code: int) -> None:
        """Execute a CMD write; GET results are read back from CMD."""
        self.last_cmd = code
        self.counters[f"cmd {V.command_name(code)}"] += 1
        try:
            self.cmd_result = self._command(code)
        except GuestStateError as e:
            self._violation(e.where, e.field, e.detail)
            self.cmd_result = 1 if code == V.Cmd.ACTIVATE_DEV else 0

    def _command(self, code: int) -> int:
        C = V.Cmd
        if code == C.ACTIVATE_DEV:
            self._activate()
            return 0
        if code == C.QUIESCE_DEV:
            self.active = False
            return 0
        if code == C.RESET_DEV:
            self._deactivate()
            self.ecr = 0
            self.pending = [False] * V.MAX_INTRS
            return 0
        if code == C.UPDATE_RX_MODE:
            self.rx_mode = struct.unpack("<I", self._shared("rxMode", self._rxf_off(), 4))[0]
            return 0
        if code == C.UPDATE_MAC_FILTERS:
            self._read_mcast_table()
            return 0
        if code == C.UPDATE_VLAN_FILTERS:
            self.vlan_table = self._shared("vfTable", self._rxf_off() + 16, 512)
            return 0
        if code == C.UPDATE_FEATURE:
            self.upt_features = struct.unpack("<Q", self._shared("uptFeatures", 8 + 16, 8))[0]
            return 0
        if code in (C.UPDATE_RSSIDT, C.UPDATE_IML, C.UPDATE_PMCFG, C.LOAD_PLUGIN, C.SET_COALESCE,
                    C.REGISTER_MEMREGS, C.SET_RSS_FIELDS):
            return 0  # accepted; this model does no RSS, moderation, wake-up or coalescing
        if code == C.GET_QUEUE_STATUS:
            self._write_queue_status()
            return 0
        if code == C.GET_STATS:
            self._write_stats()
            return 0
        if code == C.GET_LINK:
            return V.LINK_UP if self.link_up else V.LINK_DOWN
        if code == C.GET_PERM_MAC_LO:
            return int.from_bytes(self.perm_mac[:4], "little")
        if code == C.GET_PERM_MAC_HI:
            return int.from_bytes(self.perm_mac[4:], "little")
        if code == C.GET_DID_LO:
            return V.DEVICE_ID
        if code == C.GET_DID_HI:
            return self.revision
        if code in (C.GET_DEV_EXTRA_INFO, C.GET_COALESCE, C.GET_RSS_FIELDS, C.GET_RESERVED2, C.GET_RESERVED3):
            return 0
        if code == C.GET_CONF_INTR:
            return V.IT_AUTO | V.IMM_AUTO << 2  # the driver picks MSI-X, then MSI, then INTx
        if code == C.GET_RESERVED1:
            return 1  # adaptive ring info: "disable adaptive ring"
        if code == C.GET_TXDATA_DESC_SIZE:
            return V.TXDATA_DESC_SIZE
        raise GuestStateError("CMD", "value", f"unknown command {code:#010x}")

    def _rxf_off(self) -> int:
        return 8 + V.MiscConf.sizeof() + V.IntrConf.sizeof()

    def _read_mcast_table(self) -> None:
        raw = self._shared("rxFilterConf", self._rxf_off(), 16)
        n, pa = struct.unpack_from("<H", raw, 4)[0], struct.unpack_from("<Q", raw, 8)[0]
        if n % 6 or n > 6 * 4096:
            raise GuestStateError("UPDATE_MAC_FILTERS", "mfTableLen", f"{n} is not a multiple of 6 (or huge)")
        table = self._read("UPDATE_MAC_FILTERS", "mfTablePA", pa, n) if n else b""
        self.mcast = {table[i:i + 6] for i in range(0, n, 6)}

    def _activate(self) -> None:
        if self.revision_selected == 0:
            log.info("%s: ACTIVATE_DEV before a revision was selected; assuming revision 1", self.name)
        raw = self._shared("DriverShared", 0, V.DRIVER_SHARED_SIZE)
        ds = V.DriverShared.parse(raw)
        if ds.magic != V.REV1_MAGIC:
            raise GuestStateError("ACTIVATE_DEV", "magic", f"{ds.magic:#x}, expected {V.REV1_MAGIC:#x}")
        misc, ic = ds.devRead.misc, ds.devRead.intrConf
        ntx, nrx = misc.numTxQueues, misc.numRxQueues
        if not 1 <= ntx <= V.MAX_TX_QUEUES:
            raise GuestStateError("ACTIVATE_DEV", "numTxQueues", f"{ntx} (1..{V.MAX_TX_QUEUES})")
        if not 1 <= nrx <= V.MAX_RX_QUEUES:
            raise GuestStateError("ACTIVATE_DEV", "numRxQueues", f"{nrx} (1..{V.MAX_RX_QUEUES})")
        if misc.queueDescLen < (ntx + nrx) * V.QUEUE_DESC_SIZE:
            raise GuestStateError("ACTIVATE_DEV", "queueDescLen",
                                  f"{misc.queueDescLen} < {(ntx + nrx) * V.QUEUE_DESC_SIZE} for {ntx}+{nrx} queues")
        if not 1 <= ic.numIntrs <= V.MAX_INTRS or ic.eventIntrIdx >= ic.numIntrs:
            raise GuestStateError("ACTIVATE_DEV", "intrConf",
                                  f"numIntrs {ic.numIntrs}, eventIntrIdx {ic.eventIntrIdx}")
        table = self._read("ACTIVATE_DEV", "queueDescPA", misc.queueDescPA, (ntx + nrx) * V.QUEUE_DESC_SIZE)
        txq, rxq = [], []
        for q in range(ntx):
            off = q * V.QUEUE_DESC_SIZE
            c = V.TxQueueConf.parse(table[off + V.QUEUE_CONF_OFFSET:])
            where = f"txq{q}"
            self._check_ring(where, "txRing", c.txRingBasePA, c.txRingSize, V.TX_RING_MAX)
            self._check_ring(where, "compRing", c.compRingBasePA, c.compRingSize, V.TC_RING_MAX)
            self._check_intr(where, c.intrIdx, ic.numIntrs)
            txq.append(TxQueue(q, misc.queueDescPA + off, Ring(c.txRingBasePA, c.txRingSize),
                               Ring(c.compRingBasePA, c.compRingSize), c.intrIdx))
        for q in range(nrx):
            off = (ntx + q) * V.QUEUE_DESC_SIZE
            c = V.RxQueueConf.parse(table[off + V.QUEUE_CONF_OFFSET:])
            where = f"rxq{q}"
            self._check_ring(where, "rxRing[0]", c.rxRingBasePA[0], c.rxRingSize[0], V.RX_RING_MAX)
            if c.rxRingSize[1]:
                self._check_ring(where, "rxRing[1]", c.rxRingBasePA[1], c.rxRingSize[1], V.RX_RING_MAX)
            self._check_ring(where, "compRing", c.compRingBasePA, c.compRingSize, V.RC_RING_MAX)
            self._check_intr(where, c.intrIdx, ic.numIntrs)
            rings = (Ring(c.rxRingBasePA[0], c.rxRingSize[0]), Ring(c.rxRingBasePA[1], c.rxRingSize[1]))
            rxq.append(RxQueue(q, misc.queueDescPA + off, rings, Ring(c.compRingBasePA, c.compRingSize),
                               c.intrIdx))
        self.txq, self.rxq = txq, rxq
        self.num_intrs = ic.numIntrs
        self.event_intr = ic.eventIntrIdx
        self.auto_mask = bool(ic.autoMask)
        self.upt_features = misc.uptFeatures
        self.rx_mode = ds.devRead.rxFilterConf.rxMode
        self.vlan_table = raw[self._rxf_off() + 16:][:512]
        try:
            self._read_mcast_table()
        except GuestStateError as e:
            self._violation(e.where, e.field, e.detail)
        self.active = True
        log.info("%s: activated: %d tx / %d rx queues, %d interrupts, mtu %d, features %#x", self.name,
                 ntx, nrx, ic.numIntrs, misc.mtu, misc.uptFeatures)

    def _check_ring(self, where: str, field: str, base: int, size: int, limit: int) -> None:
        if size == 0 or size % V.RING_SIZE_ALIGN or size > limit:
            raise GuestStateError(where, f"{field}Size", f"{size} (a multiple of {V.RING_SIZE_ALIGN}, <= {limit})")
        if base == 0 or base % V.DESC_SIZE:
            raise GuestStateError(where, f"{field}BasePA", f"{base:#x} is not a descriptor-aligned address")
        if self.dma_view(base, size * V.DESC_SIZE) is None:
            self._read(where, f"{field}BasePA", base, V.DESC_SIZE)  # at least reachable (fd-less mapping)

    def _check_intr(self, where: str, idx: int, num: int) -> None:
        if idx >= num:
            raise GuestStateError(where, "intrIdx", f"{idx} >= numIntrs {num}")

    def _write_queue_status(self) -> None:
        for q in [*self.txq, *self.rxq]:
            self._write("GET_QUEUE_STATUS", f"queue {q.qid}", q.desc_pa + V.QUEUE_STATUS_OFFSET,
                        V.QueueStatus.build({"stopped": int(q.stopped), "error": q.error}))

    def _write_stats(self) -> None:
        for t in self.txq:
            self._write("GET_STATS", f"txq{t.qid}", t.desc_pa + V.QUEUE_STATS_OFFSET,
                        V.TxStats.build({k.name: t.stats[k.name] for k in V.TxStats.subcons}))
        for r in self.rxq:
            self._write("GET_STATS", f"rxq{r.qid}", r.desc_pa + V.QUEUE_STATS_OFFSET,
                        V.RxStats.build({k.name: r.stats[k.name] for k in V.RxStats.subcons}))

    def _queue_error(self, q: TxQueue | RxQueue, e: GuestStateError) -> None:
        self._violation(e.where, e.field, e.detail)
        q.stopped, q.error = True, e.code
        self._post_event(V.ECR_TQERR if isinstance(q, TxQueue) else V.ECR_RQERR)

    # ============================================================ transmit
    def process_tx(self, qid: int) -> int:
        """Send every packet the driver has handed over on tx queue ``qid``; returns how many."""
        with self.lock:
            if not self.active or qid >= len(self.txq):
                return 0
            q = self.txq[qid]
            if q.stopped:
                return 0
            sent = 0
            completed = False
            try:
                for _ in range(q.ring.size):
                    pkt = self._take_tx_packet(q)
                    if pkt is None:
                        break
                    frames, eop_idx, cq = pkt
                    for frame in frames:
                        self._emit(q, frame)
                    sent += 1
                    if cq:
                        self._complete_tx(q, eop_idx)
                        completed = True
            except GuestStateError as e:
                self._queue_error(q, e)
            if completed:
                self.raise_intr(q.intr)
            return sent

    def _take_tx_packet(self, q: TxQueue) -> tuple[list[bytes], int, bool] | None:
        where = f"txq{q.qid}"
        first = self._read(where, "txRing", q.ring.addr(), V.DESC_SIZE)
        if V.unpack_txd(first).gen != q.ring.gen:
            return None
        descs = []
        idx, gen = q.ring.idx, q.ring.gen
        while True:
            raw = first if not descs else self._read(where, "txRing", q.ring.base + V.DESC_SIZE * idx, V.DESC_SIZE)
            d = V.unpack_txd(raw)
            if d.gen != gen:
                raise GuestStateError(where, f"txRing[{idx}].gen", "packet ends before its EOP descriptor",
                                      V.ERR_NOEOP)
            descs.append((idx, d))
            idx += 1
            if idx == q.ring.size:
                idx, gen = 0, gen ^ 1
            if d.eop:
                break
            if len(descs) >= q.ring.size:
                raise GuestStateError(where, "txRing", "no EOP descriptor in the whole ring", V.ERR_NOEOP)
        sop = descs[0][1]
        if sop.om not in (V.OM_TSO,) and len(descs) > V.MAX_TXD_PER_PKT:
            raise GuestStateError(where, "txRing", f"{len(descs)} descriptors for one packet", V.ERR_BIG_PKT)
        if sop.dtype:
            raise GuestStateError(where, f"txRing[{descs[0][0]}].dtype", "descriptor type 1 not supported",
                                  V.ERR_DESC_NOT_SPT)
        parts = []
        for i, d in descs:
            n = d.len or V.MAX_TX_BUF_SIZE
            parts.append(self._read(where, f"txRing[{i}].addr", d.addr, n))
        for _ in descs:
            q.ring.advance()
        frame = b"".join(parts)
        eop_idx = descs[-1][0]
        frames = self._tx_offload(where, frame, sop, q)
        return frames, eop_idx, descs[-1][1].cq

    def _tx_offload(self, where: str, frame: bytes, sop: V.Txd, q: TxQueue) -> list[bytes]:
        frames = [frame]
        if sop.om == V.OM_CSUM:
            buf = bytearray(frame)
            # hlen: where summing starts (the L4 header); msscof: the checksum field, from the frame start.
            if not offload.insert_checksum(buf, sop.hlen, sop.msscof):
                self._violation(where, "hlen/msscof", f"checksum from {sop.hlen} into {sop.msscof} does not "
                                                      f"fit the {len(frame)}-byte frame")
            frames = [bytes(buf)]
        elif sop.om == V.OM_TSO:
            segs = offload.tso_segments(frame, sop.hlen, sop.msscof)
            if segs is None:
                self._violation(where, "hlen/msscof", f"TSO with hlen {sop.hlen}, mss {sop.msscof} on an "
                                                      "unparsable frame; sent as is")
            else:
                frames = segs
                q.stats["TSOPktsTxOK"] += 1
                q.stats["TSOBytesTxOK"] += len(frame)
        elif sop.om != V.OM_NONE:
            self._violation(where, "om", f"offload mode {sop.om} not offered; sent as is")
        if sop.ti:
            frames = [insert_vlan(f, sop.tci) for f in frames]
        return frames

    def _count_ok(self, stats: Counter, direction: str, frame: bytes) -> None:
        """The per-queue UPT1 counters (ucast/mcast/bcast Pkts/Bytes ``direction``OK) and the device's
        totals for one good frame; ``direction`` is "Tx" or "Rx".  Per frame, so the counter names are
        looked up (_OK_KEYS), not formatted."""
        kind = "bcast" if frame[:6] == BROADCAST_MAC else "mcast" if frame[0] & 1 else "ucast"
        pkts, nbytes, frames, total = _OK_KEYS[direction, kind]
        stats[pkts] += 1
        stats[nbytes] += len(frame)
        self.counters[frames] += 1
        self.counters[total] += len(frame)

    def _emit(self, q: TxQueue, frame: bytes) -> None:
        self._count_ok(q.stats, "Tx", frame)
        if not self.link_up or self.port is None:
            q.stats["pktsTxDiscard"] += 1
            self.counters["tx_dropped " + ("link-down" if self.port else "no-port")] += 1
            return
        self.port.send(frame)

    def _complete_tx(self, q: TxQueue, eop_idx: int) -> None:
        raw = V.pack_tcd(eop_idx, q.comp.gen)
        addr = q.comp.addr()
        self._write(f"txq{q.qid}", "compRing", addr, raw[:12])
        self._write(f"txq{q.qid}", "compRing", addr + 12, raw[12:])  # generation bit last
        q.comp.advance()

    # ============================================================ receive
    def deliver(self, frame: bytes) -> str | None:
        """Switch -> device: put ``frame`` into rx queue 0; returns a drop reason or None."""
        with self.lock:
            if not self.link_up:
                return "link-down"
            if not self.active or not self.rxq:
                return "not-active"
            q = self.rxq[0]
            if q.stopped:
                return "queue-stopped"
            if not self._accepts(frame):
                return "filtered"
            try:
                reason = self._receive(q, frame)
            except GuestStateError as e:
                self._queue_error(q, e)
                return "queue-error"
            if reason is not None:
                q.stats["pktsRxOutOfBuf" if reason == "no-rx-buffer" else "pktsRxError"] += 1
                self.counters[f"rx_dropped {reason}"] += 1
                return reason
            self._count_ok(q.stats, "Rx", frame)
        self.raise_intr(q.intr)
        return None

    def _accepts(self, frame: bytes) -> bool:
        if len(frame) < 14:
            return False
        mode = self.rx_mode
        if mode & V.RXM_PROMISC:
            return True
        dst = frame[:6]
        if frame[12:14] == b"\x81\x00":
            vid = int.from_bytes(frame[14:16], "big") & 0xFFF
            if not self.vlan_table[vid >> 3] >> (vid & 7) & 1:
                return False
        if dst == BROADCAST_MAC:
            return bool(mode & V.RXM_BCAST)
        if dst[0] & 1:
            return bool(mode & V.RXM_ALL_MULTI) or bool(mode & V.RXM_MCAST and dst in self.mcast)
        return bool(mode & V.RXM_UCAST) and dst == self.mac

    def _receive(self, q: RxQueue, frame: bytes) -> str | None:
        where = f"rxq{q.qid}"
        r0, r1 = q.rings
        # Look ahead without consuming: ring 1 head (+ ring 1 body buffers), then ring 2 bodies; commit at the end.
        plan: list[tuple[int, int, int, int]] = []  # (ring number, index, addr, len)
        need = len(frame)
        cursors = [[r0.idx, r0.gen], [r1.idx, r1.gen]]
        ring_no = 0
        skipped = 0
        while need > 0:
            ring = q.rings[ring_no]
            if ring.size == 0:
                return "no-rx-buffer"
            idx, gen = cursors[ring_no]
            addr, length, btype, dgen = V.unpack_rxd(self._read(where, f"rxRing[{ring_no}]",
                                                                ring.base + V.DESC_SIZE * idx, V.DESC_SIZE))
            if dgen != gen:
                if ring_no == 0 and plan:
                    ring_no = 1
                    continue
                return "no-rx-buffer"
            if not plan and btype != V.RXD_BTYPE_HEAD:
                # A body buffer the previous (shorter) packet did not need: skip it, as the hardware
                # does; the driver reclaims it when it sees the next completion's index.
                skipped += 1
                if skipped > ring.size:
                    raise GuestStateError(where, "rxRing[0].btype", "no head buffer in the whole ring",
                                          V.ERR_SMALL_BUF)
                idx += 1
                if idx == ring.size:
                    idx, gen = 0, gen ^ 1
                cursors[0] = [idx, gen]
                continue
            if plan and ring_no == 0 and btype == V.RXD_BTYPE_HEAD:
                ring_no = 1  # the next ring-1 buffer belongs to the next packet
                continue
            if length == 0:
                raise GuestStateError(where, f"rxRing[{ring_no}][{idx}].len", "zero-length buffer",
                                      V.ERR_SMALL_BUF)
            take = min(need, length)
            plan.append((ring_no, idx, addr, take))
            need -= take
            idx += 1
            if idx == ring.size:
                idx, gen = 0, gen ^ 1
            cursors[ring_no] = [idx, gen]
            if len(plan) > 64:
                return "frame-too-long"
        pos = 0
        for ring_no, idx, addr, take in plan:
            self._write(where, f"rxRing[{ring_no}][{idx}].addr", addr, frame[pos:pos + take])
            pos += take
        for ring, (idx, gen) in zip(q.rings, cursors):
            ring.idx, ring.gen = idx, gen
        nq = len(self.rxq)
        for k, (ring_no, idx, _addr, take) in enumerate(plan):
            raw = V.pack_rcd(idx, q.qid + ring_no * nq, take, q.comp.gen, sop=k == 0, eop=k == len(plan) - 1)
            addr = q.comp.addr()
            self._write(where, "compRing", addr, raw[:12])
            self._write(where, "compRing", addr + 12, raw[12:])  # generation bit last
            q.comp.advance()
        return None
