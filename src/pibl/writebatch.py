"""Writes held until the event loop has run a turn's callbacks, then sent one after another.

A connection's output made during a turn (a response to the client, a request to an upstream)
is handed to its transport, one ``writev`` per connection as before, only once the turn's
callbacks have run. The sends then follow one another instead of alternating with request
work. Over loopback each send wakes its reader if it sleeps; sent back to back, one wake-up
finds several messages ready, and the proxy keeps its CPU (Netty's ``FlushConsolidationHandler``
exists for the same reason; ``bench/README.md`` has the figures). Nothing waits longer than the
rest of its turn, and output of ``HOLD_BELOW`` bytes or more is written at once, so large bodies
stream as they come and back-pressure (``pause_writing``) stays immediate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

log: Final = logging.getLogger("pibl.server")

HOLD_BELOW: Final = 64 * 1024


class WriteBatch:
    """The outputs holding bytes in this turn of one event loop (one batch per ``ProxyApp``)."""

    __slots__ = ("_held", "_loop")

    def __init__(self) -> None:
        self._held: list[HeldOutput] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def hold(self, output: HeldOutput) -> None:
        if not self._held:
            loop = self._loop
            if loop is None:
                # Looked up once: get_running_loop() calls getpid() each time.
                loop = self._loop = asyncio.get_running_loop()
            # A callback scheduled now runs after this turn's I/O callbacks (uvloop and asyncio
            # both run the ready queue after polling).
            loop.call_soon(self.flush)
        self._held.append(output)

    def flush(self) -> None:
        held = self._held
        self._held = []
        for output in held:
            try:
                output.flush()
            except Exception:  # one broken transport must not keep the others' bytes back
                log.exception("writing to %r failed", output.transport)


class HeldOutput:
    """One transport's writes, held in a ``WriteBatch`` until the end of the loop's turn.

    Order is kept as long as every write to the transport goes through here. The owner calls
    ``flush`` before closing the transport (what was written goes out before the FIN) and
    ``drop`` when the connection is aborted or lost.
    """

    __slots__ = ("_batch", "_pieces", "_size", "transport")

    def __init__(self, transport: asyncio.WriteTransport, batch: WriteBatch) -> None:
        self.transport = transport
        self._batch = batch
        self._pieces: list[bytes] | None = None
        self._size = 0

    def writelines(self, data: list[bytes]) -> None:
        """Hold ``data`` (taken over: the caller must not change the list afterwards)."""
        size = self._size
        for piece in data:
            size += len(piece)
        pieces = self._pieces
        if pieces is None:
            if size >= HOLD_BELOW:
                self.transport.writelines(data)
                return
            self._pieces = data
            self._size = size
            self._batch.hold(self)
        else:
            pieces.extend(data)
            self._size = size
            if size >= HOLD_BELOW:
                self.flush()

    def flush(self) -> None:
        """Hand what is held to the transport now."""
        pieces = self._pieces
        if pieces is not None:
            self._pieces = None
            self._size = 0
            if not self.transport.is_closing():
                self.transport.writelines(pieces)

    def drop(self) -> None:
        self._pieces = None
        self._size = 0
