"""A minimal vmxnet3 *driver* on the vfio-user client, over guest memory in a memfd.

It does what Linux's vmxnet3 driver does at probe and open (version selection, MAC, interrupt setup,
driver-shared area, queue descriptor table, rings with generation bits, doorbells), one tx and one rx
queue, so that unit tests and benchmarks can drive the device model in-process without a guest.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from construct import Container

from hvlab.protocol import vfio_user as P
from hvlab.protocol import vmxnet3 as V
from hvlab.vfio_user.client import VfioUserClient
from hvlab.vfio_user.pci import CMD_MASTER, CMD_MEMORY, COMMAND, MSI_FLAGS_ENABLE, MSIX_FLAGS_ENABLE

GPA_BASE = 0x100000


class GuestMemory:
    """Guest RAM: a memfd the client DMA_MAPs, with a bump allocator."""

    def __init__(self, size: int = 4 << 20, base: int = GPA_BASE) -> None:
        self.base, self.size = base, size
        self.fd = os.memfd_create("hvlab-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
        self._next = base

    def alloc(self, size: int, align: int = 512) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > self.base + self.size:
            raise MemoryError("guest memory exhausted")
        self._next = gpa + size
        return gpa

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem[gpa - self.base:gpa - self.base + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa - self.base:gpa - self.base + len(data)] = data

    def map(self, client: VfioUserClient) -> None:
        client.dma_map(self.base, self.size, self.fd)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@dataclass
class RingState:
    base: int
    size: int
    idx: int = 0
    gen: int = V.INIT_GEN

    def advance(self) -> None:
        self.idx += 1
        if self.idx == self.size:
            self.idx, self.gen = 0, self.gen ^ 1


class MiniDriver:
    """One tx and one rx queue; ``intr`` is "msix", "msi" or "intx"."""

    RX_BUF = 1536

    def __init__(self, client: VfioUserClient, mem: GuestMemory, *, intr: str = "msix",
                 ring_size: int = 32, rx_buf_per_pkt: int = 1) -> None:
        self.c, self.mem, self.intr, self.ring_size = client, mem, intr, ring_size
        self.rx_buf_per_pkt = rx_buf_per_pkt  # > 1: ring 1 interleaves HEAD and BODY buffers (jumbo MTU)
        self.eventfds: list[int] = []
        self.revision = 0
        self.mac = b""

    # ------------------------------------------------------------------ registers
    def vd_read(self, reg: int) -> int:
        return self.c.bar_read(1, reg, 4)

    def vd_write(self, reg: int, value: int) -> None:
        self.c.bar_write(1, reg, 4, value)

    def pt_write(self, reg: int, value: int) -> None:
        self.c.bar_write(0, reg, 4, value)

    def cmd(self, code: int) -> int:
        self.vd_write(V.Bar1.CMD, code)
        return self.vd_read(V.Bar1.CMD)

    # ------------------------------------------------------------------ probe / open
    def probe(self) -> None:
        vrrs = self.vd_read(V.Bar1.VRRS)
        if not vrrs & 1:
            raise RuntimeError(f"incompatible hardware version {vrrs:#x}")
        self.revision = vrrs.bit_length()
        self.vd_write(V.Bar1.VRRS, 1 << (self.revision - 1))
        if not self.vd_read(V.Bar1.UVRS) & 1:
            raise RuntimeError("incompatible UPT version")
        self.vd_write(V.Bar1.UVRS, 1)
        self.c.config_write(COMMAND, 2, self.c.config_read(COMMAND, 2) | CMD_MEMORY | CMD_MASTER)
        self.mac = struct.pack("<IH", self.vd_read(V.Bar1.MACL), self.vd_read(V.Bar1.MACH) & 0xFFFF)
        self.setup_interrupts()

    def _cap(self, cap_id: int) -> int:
        pos = self.c.config_read(0x34, 1)
        while pos:
            if self.c.config_read(pos, 1) == cap_id:
                return pos
            pos = self.c.config_read(pos + 1, 1)
        raise RuntimeError(f"capability {cap_id:#x} not found")

    def setup_interrupts(self) -> None:
        n = {"msix": 3, "msi": 1, "intx": 1}[self.intr]
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        index = {"msix": P.PciIrq.MSIX, "msi": P.PciIrq.MSI, "intx": P.PciIrq.INTX}[self.intr]
        self.c.set_irq_eventfds(index, self.eventfds)
        if self.intr == "msix":
            cap = self._cap(0x11)
            self.c.config_write(cap + 2, 2, self.c.config_read(cap + 2, 2) | MSIX_FLAGS_ENABLE)
        elif self.intr == "msi":
            cap = self._cap(0x05)
            self.c.config_write(cap + 2, 2, self.c.config_read(cap + 2, 2) | MSI_FLAGS_ENABLE)

    @property
    def num_intrs(self) -> int:
        return 3 if self.intr == "msix" else 1

    def activate(self, *, rx_mode: int = V.RXM_UCAST | V.RXM_BCAST, queue_desc_len: int | None = None,
                 tx_ring_size: int | None = None) -> int:
        """Allocate rings, fill the shared area, ACTIVATE_DEV; returns the command result (0 = ok)."""
        m, n = self.mem, self.ring_size
        self.shared = m.alloc(V.DRIVER_SHARED_SIZE)
        self.qdesc = m.alloc(2 * V.QUEUE_DESC_SIZE, 128)
        self.tx = RingState(m.alloc(n * 16), tx_ring_size or n)
        self.tc = RingState(m.alloc(n * 16), n)
        self.rx = [RingState(m.alloc(n * 16), n), RingState(m.alloc(n * 16), n)]
        self.rc = RingState(m.alloc(2 * n * 16), 2 * n)
        self.tx_bufs = [m.alloc(2048, 64) for _ in range(n)]
        self.rx_bufs = [[m.alloc(4096, 4096) for _ in range(n)], [m.alloc(4096, 4096) for _ in range(n)]]
        for ring_no, ring in enumerate(self.rx):
            for i in range(n):
                m.write(ring.base + 16 * i, V.pack_rxd(self.rx_bufs[ring_no][i], *self._rx_kind(ring_no, i),
                                                       ring.gen))
        eidx = 2 if self.intr == "msix" else 0
        tx_intr, rx_intr = (0, 1) if self.intr == "msix" else (0, 0)
        ds = {
            "magic": V.REV1_MAGIC,
            "devRead": {
                "misc": {
                    "driverInfo": {"version": 0x01070000, "gos": {"gosMisc": 0, "gosVer": 6, "gosType": 1,
                                                                  "gosBits": 2},
                                   "vmxnet3RevSpt": 1, "uptVerSpt": 1},
                    "uptFeatures": V.UPT1_F_RXCSUM, "ddPA": 0, "queueDescPA": self.qdesc, "ddLen": 0,
                    "queueDescLen": 2 * V.QUEUE_DESC_SIZE if queue_desc_len is None else queue_desc_len,
                    "mtu": 1500, "maxNumRxSG": 18, "numTxQueues": 1, "numRxQueues": 1, "reserved": [0] * 4,
                },
                "intrConf": {"autoMask": 0, "numIntrs": self.num_intrs, "eventIntrIdx": eidx,
                             "modLevels": [0] * V.MAX_INTRS, "intrCtrl": 0, "reserved": [0, 0]},
                "rxFilterConf": {"rxMode": rx_mode, "mfTableLen": 0, "mfTablePA": 0,
                                 "vfTable": [0] * V.VFT_SIZE},
                "rssConfDesc": _zero_varconf(), "pmConfDesc": _zero_varconf(), "pluginConfDesc": _zero_varconf(),
            },
            "ecr": 0, "reserved": 0, "cmdInfo": bytes(16),
        }
        m.write(self.shared, V.DriverShared.build(ds))
        txc = {"txRingBasePA": self.tx.base, "dataRingBasePA": 0, "compRingBasePA": self.tc.base, "ddPA": 0,
               "reserved": 0, "txRingSize": self.tx.size, "dataRingSize": n, "compRingSize": n, "ddLen": 0,
               "intrIdx": tx_intr, "txDataRingDescSize": 128}
        rxc = {"rxRingBasePA": [self.rx[0].base, self.rx[1].base], "compRingBasePA": self.rc.base, "ddPA": 0,
               "rxDataRingBasePA": 0, "rxRingSize": [n, n], "compRingSize": 2 * n, "ddLen": 0,
               "intrIdx": rx_intr, "rxDataRingDescSize": 0}
        m.write(self.qdesc, V.TxQueueDesc.build(_qdesc(txc, V.TxStats, {"txNumDeferred": 0, "txThreshold": 0,
                                                                       "reserved": 0})))
        m.write(self.qdesc + V.QUEUE_DESC_SIZE,
                V.RxQueueDesc.build(_qdesc(rxc, V.RxStats, {"updateRxProd": 0, "reserved": 0})))
        self.vd_write(V.Bar1.DSAL, self.shared & 0xFFFFFFFF)
        self.vd_write(V.Bar1.DSAH, self.shared >> 32)
        result = self.cmd(V.Cmd.ACTIVATE_DEV)
        for i in range(self.num_intrs):
            self.pt_write(V.Bar0.IMR + 8 * i, 0)
        return result

    def write_shared(self, offset: int, data: bytes) -> None:
        self.mem.write(self.shared + offset, data)

    # ------------------------------------------------------------------ data path
    def send(self, frame: bytes, *, om: int = V.OM_NONE, hlen: int = 0, msscof: int = 0,
             doorbell: bool = True) -> int:
        """Post one single-descriptor packet; returns its ring index."""
        idx = self.tx.idx
        buf = self.tx_bufs[idx % len(self.tx_bufs)]
        self.mem.write(buf, frame)
        self.mem.write(self.tx.base + 16 * idx,
                       V.pack_txd(buf, len(frame), self.tx.gen, om=om, hlen=hlen, msscof=msscof))
        self.tx.advance()
        if doorbell:
            self.pt_write(V.Bar0.TXPROD, self.tx.idx)
        return idx

    def tx_completions(self) -> list[int]:
        done = []
        while True:
            idx, typ, gen = V.unpack_tcd(self.mem.read(self.tc.base + 16 * self.tc.idx, 16))
            if gen != self.tc.gen:
                return done
            done.append(idx)
            self.tc.advance()

    def receive(self) -> list[bytes]:
        """Frames the device completed since the last call; their buffers are given back."""
        frames: list[bytes] = []
        cur = b""
        while True:
            rcd = V.unpack_rcd(self.mem.read(self.rc.base + 16 * self.rc.idx, 16))
            if rcd["gen"] != self.rc.gen:
                return frames
            ring_no = 0 if rcd["rqID"] == 0 else 1
            cur += self.mem.read(self.rx_bufs[ring_no][rcd["rxdIdx"]], rcd["len"])
            self._refill(ring_no, rcd["rxdIdx"])
            if rcd["eop"]:
                frames.append(cur)
                cur = b""
            self.rc.advance()

    def _rx_kind(self, ring_no: int, i: int) -> tuple[int, int]:
        """(length, btype) of rx buffer ``i`` of a ring, as Linux lays them out."""
        if ring_no == 0 and i % self.rx_buf_per_pkt == 0:
            return self.RX_BUF, V.RXD_BTYPE_HEAD
        return 4096, V.RXD_BTYPE_BODY

    def _refill(self, ring_no: int, upto: int) -> None:
        """Give back every descriptor up to the completed one, skipped ones included (as Linux does)."""
        ring = self.rx[ring_no]
        while True:
            i = ring.idx
            self.mem.write(ring.base + 16 * i,
                           V.pack_rxd(self.rx_bufs[ring_no][i], *self._rx_kind(ring_no, i), ring.gen ^ 1))
            ring.advance()
            if i == upto:
                return

    def ecr(self) -> int:
        return struct.unpack("<I", self.mem.read(self.shared + V.ECR_OFFSET, 4))[0]

    def queue_status(self, n: int) -> Container:
        return V.QueueStatus.parse(self.mem.read(self.qdesc + n * V.QUEUE_DESC_SIZE + V.QUEUE_STATUS_OFFSET, 8))

    def fired(self, vector: int) -> int:
        try:
            return int.from_bytes(os.read(self.eventfds[vector], 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []


def _zero_varconf() -> dict[str, int]:
    return {"confVer": 0, "confLen": 0, "confPA": 0}


def _qdesc(conf: dict, stats: object, ctrl: dict) -> dict:
    return {"ctrl": ctrl, "conf": conf, "status": {"stopped": 0, "error": 0},
            "stats": {s.name: 0 for s in stats.subcons}}  # type: ignore[attr-defined]
