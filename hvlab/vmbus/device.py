"""The base class of VMBus device models (netvsp, vpci, integration components).

A device declares who it is (class and instance GUIDs, offer details) and reacts to its channels'
life cycle and packets. It never touches KVM, SynIC pages or the message protocol: the server turns
guest messages into these callbacks, and ``Channel`` turns sends into ring writes and interrupts. So
the same device runs against the real guest and against the pure-Python guest model in unit tests.

All callbacks run under the server lock and must not block (no waiting for the guest inside a
callback: the guest can only answer after the callback returns). Work that must happen later goes
through a Scheduler (hvlab.vmbus.loop).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, ClassVar

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.ring import SignalPolicy

if TYPE_CHECKING:
    from hvlab.vmbus.channel import Channel, GpadlBuffer
    from hvlab.vmbus.server import VmbusServer


class VmbusDevice:
    """Subclass and override the ``on_*`` hooks.

    Class attributes (override per device type):
      ``class_guid``            the offer's if_type (which guest driver binds);
      ``name``                  for logs and the timeline;
      ``ring_size_hint``        bytes per ring the guest driver is expected to use (informational: the
                                guest chooses; e.g. 4 pages for hv_utils, 512 KiB for netvsc);
      ``max_packet_size``       largest guest packet accepted (len8·8); bigger ones are violations;
      ``mmio_megabytes``, ``user_def``, ``is_dedicated_interrupt``  copied into the offer;
      ``signal_policy``         when a host write interrupts the guest; None = the server's default
                                (empty → non-empty, as Hyper-V). Drivers that read one packet per
                                interrupt without masking (hv_utils' direct callback mode) need
                                WHEN_UNMASKED or a second queued packet waits for an unrelated interrupt.
    """

    class_guid: ClassVar[uuid.UUID | None] = None
    name: str = "vmbus-device"
    ring_size_hint: int | None = None
    max_packet_size: int | None = None
    mmio_megabytes: int = 0
    user_def: bytes = b""
    is_dedicated_interrupt: bool = True
    signal_policy: SignalPolicy | None = None

    def __init__(
        self,
        instance_guid: vm.GuidLike | None = None,
        *,
        class_guid: vm.GuidLike | None = None,
        name: str | None = None,
    ) -> None:
        guid = class_guid if class_guid is not None else type(self).class_guid
        if guid is None:
            raise ValueError(f"{type(self).__name__} needs a class GUID")
        self.class_guid = vm.to_uuid(guid)
        self.instance_guid = vm.to_uuid(instance_guid) if instance_guid is not None else uuid.uuid4()
        if name is not None:
            self.name = name
        self.server: VmbusServer | None = None
        self.channels: list[Channel] = []
        """Live channels (primary first), maintained by the server."""

    @property
    def primary(self) -> Channel | None:
        return next((c for c in self.channels if c.sub_channel_index == 0), None)

    def attach(self, server: VmbusServer) -> None:
        """Called by VmbusServer.add_device."""
        self.server = server

    def offer_subchannel(self) -> Channel:
        """Offer one more channel with the same GUIDs and the next sub_channel_index (netvsc vRSS)."""
        if self.server is None:
            raise RuntimeError(f"{self.name} is not attached to a server")
        return self.server.offer_subchannel(self)

    # Hooks ---------------------------------------------------------------------------------------
    def can_open(self, channel: Channel) -> bool:
        """Accept OPENCHANNEL? False answers OPENCHANNEL_RESULT with a failure status (-EAGAIN)."""
        return True

    def on_open(self, channel: Channel) -> None:
        """The channel is open. OPENCHANNEL_RESULT is queued but the guest may not have processed it
        yet, so a device that speaks first should schedule its first packet rather than send here."""

    def on_close(self, channel: Channel) -> None:
        """The channel closed (CLOSECHANNEL, rescind, unload, reset or a ring violation): stop using it."""

    def on_packet(self, channel: Channel, packet: vp.Packet) -> None:
        """One packet from the guest, in ring order. Complete it if ``packet.completion_requested``."""

    def on_ring_space(self, channel: Channel) -> None:
        """A send had found the inbound ring full; the guest has made room since."""

    def on_gpadl_torn_down(self, channel: Channel, gpadl: GpadlBuffer) -> None:
        """The guest tore down a GPADL of this device (e.g. netvsc's receive buffer): forget views of it."""

    def on_removed(self) -> None:
        """remove_device finished: every channel's relid was released by the guest."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.instance_guid})"
