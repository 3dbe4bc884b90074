"""Channel doorbells: one KVM ioeventfd per VMBus connection id, so a guest's HvSignalEvent never exits.

The hypercall stub turns a fast HvSignalEvent into ``out 0xE4, eax`` with the connection id in EAX
(hvlab.hyperv.hypercall). For every open channel we register an ioeventfd on port 0xE4 that matches
exactly that id: KVM completes the OUT in the kernel and signals the eventfd, and the vCPU carries on
without a user-space exit. One thread waits on all the eventfds (epoll) and calls ``on_signal(conn_id)``
(the VMBus server's ``handle_signal_event``), which drains the channel's ring. An id without an
ioeventfd (a channel we did not register, or a bogus id) falls through to user space on the same port.

The platform owns this because it is KVM plumbing; the VMBus server only says which ids exist
(``VmbusServer.on_channels_changed``).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Iterable

from hvlab.hyperv.hypercall import FAST_PORT

log = logging.getLogger("hvlab.hyperv")


class Doorbells:
    """Keeps the set of ioeventfds equal to the set of live connection ids; dispatches their signals."""

    def __init__(self, vm, on_signal: Callable[[int], object], *, port: int = FAST_PORT) -> None:
        self.vm = vm
        self.on_signal = on_signal
        self.port = port
        self._fds: dict[int, int] = {}  # connection id -> eventfd
        self._by_fd: dict[int, int] = {}  # eventfd -> connection id
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._closing = False
        self.signals = 0
        """Doorbells rung (eventfd reads; one read may cover several guest signals: KVM adds them up)."""
        self._thread = threading.Thread(target=self._main, name="hvlab-doorbells", daemon=True)
        self._thread.start()

    @property
    def connection_ids(self) -> set[int]:
        with self._lock:
            return set(self._fds)

    def update(self, connection_ids: Iterable[int]) -> None:
        """Register ioeventfds for new ids and drop those of ids that are gone."""
        wanted = {c & 0xFFFFFFFF for c in connection_ids}
        with self._lock:
            if self._closing:
                return
            for conn in set(self._fds) - wanted:
                self._remove(conn)
            for conn in wanted - set(self._fds):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                try:
                    self.vm.ioeventfd(fd, self.port, 4, pio=True, datamatch=conn)
                except OSError as exc:  # the id still works through the slow fall-through path
                    log.warning("no ioeventfd for connection id %#x: %s", conn, exc)
                    os.close(fd)
                    continue
                self._fds[conn] = fd
                self._by_fd[fd] = conn
                self._epoll.register(fd, select.EPOLLIN)

    def _remove(self, conn: int) -> None:
        fd = self._fds.pop(conn)
        del self._by_fd[fd]
        self._epoll.unregister(fd)
        try:
            self.vm.ioeventfd(fd, self.port, 4, pio=True, datamatch=conn, deassign=True)
        except OSError as exc:
            log.debug("deassigning the ioeventfd of %#x: %s", conn, exc)
        os.close(fd)

    def _main(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed
            for fd, _ in events:
                if fd == self._wake:
                    return
                with self._lock:
                    conn = self._by_fd.get(fd)
                    if conn is None:
                        continue
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                self.signals += 1
                try:
                    self.on_signal(conn)
                except Exception:  # a device bug must not stop every other channel's doorbell
                    log.exception("doorbell handler failed for connection id %#x", conn)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=2)
        with self._lock:
            for conn in list(self._fds):
                self._remove(conn)
            self._epoll.close()
            os.close(self._wake)
