"""vfio-user in pure Python: a server for PCI device models, a client, and a config-space helper.

Wire formats live in :mod:`hvlab.protocol.vfio_user`. Typical server use::

    class MyNic(PciDevice):
        vendor_id, device_id, class_code = 0x15AD, 0x07B0, 0x020000
        bars = {0: Bar(0x1000), 1: Bar(0x1000)}
        msix = MsixCap(vectors=4, table_bar=1, table_offset=0, pba_bar=1, pba_offset=0x800)

        def bar_write(self, bar, offset, data): ...

    VfioUserServer(MyNic(), "/tmp/nic.sock").start()
"""

from hvlab.vfio_user.client import BytearrayDma, DmaHandler, RegionInfo, VfioUserClient, VfioUserError
from hvlab.vfio_user.device import DmaError, PciDevice
from hvlab.vfio_user.pci import Bar, BarKind, MsiCap, MsixCap, PciConfigSpace, PcieCap
from hvlab.vfio_user.server import ProtocolViolation, VfioUserServer

__all__ = [
    "Bar",
    "BarKind",
    "BytearrayDma",
    "DmaError",
    "DmaHandler",
    "MsiCap",
    "MsixCap",
    "PciConfigSpace",
    "PciDevice",
    "PcieCap",
    "ProtocolViolation",
    "RegionInfo",
    "VfioUserClient",
    "VfioUserError",
    "VfioUserServer",
]
