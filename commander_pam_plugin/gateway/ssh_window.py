"""SSH receive window that counts what asyncssh still buffers, so a paused reader stays bounded.

asyncssh (checked on 2.24) re-opens a channel's full receive window whenever it hands one buffered
packet to the session, even while the rest of its receive buffer waits behind a paused reader: a
server that writes faster than the client reads then refills the window after every read, and the
channel's buffer grows by up to half a window per read (a 64 KiB/s `pam launch` reader behind a
`head -c 200M /dev/zero` held 12 MiB in the gateway after 12 s, 386 packets of 32 KiB). The
override below credits only what has left that buffer. It replaces one method and only when its
source is the one it was written against; otherwise, or with `PAM_SSH_WINDOW=stock`, asyncssh's
own is kept. Upstream proposal: docs/UPSTREAM-AIORTC.md, "asyncssh: receive window".
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
from typing import Any

from asyncssh import channel as _channel
from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.packet import UInt32
from asyncssh.misc import ProtocolError

log = logging.getLogger(__name__)

# sha256 of the stock SSHChannel._deliver_data this override was written against (asyncssh 2.24.x)
STOCK_SOURCE_SHA256 = "bd94ccbaa59ab51048f695e4830ba02d0bb9af4cc44dfeb19a63a7afde35e74b"
_stock_deliver_data = _channel.SSHChannel._deliver_data
_applied = False


def stock_source_digest() -> str:
    """The digest of the installed asyncssh's method, compared with STOCK_SOURCE_SHA256."""
    return hashlib.sha256(inspect.getsource(_stock_deliver_data).encode()).hexdigest()


def _deliver_data(self: Any, data: bytes, datatype: Any) -> None:
    """Deliver one packet to the session; re-open the window only by what is no longer buffered."""
    half = self._init_recv_window / 2
    # the buffer is summed only once the window is low: most packets pass on without it
    buffered = sum(len(item) for item, _ in self._recv_buf) if self._recv_window < half else 0
    if self._recv_window + buffered < half:
        adjust = self._init_recv_window - buffered - self._recv_window
        self.logger.debug2('Sending window adjust of %d bytes, %d still buffered', adjust, buffered)
        self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
        self._recv_window += adjust
    if self._encoding:
        try:
            decoded = self._decoder.decode(data)
        except UnicodeDecodeError as exc:
            raise ProtocolError(str(exc)) from None
    else:
        decoded = data
    if self._session is not None:
        self._session.data_received(decoded, datatype)


def apply() -> bool:
    """Install the override once, where it is safe; True when asyncssh now runs it."""
    global _applied
    if _applied:
        return True
    if os.environ.get("PAM_SSH_WINDOW", "").lower() == "stock":
        return False
    digest = stock_source_digest()
    if digest != STOCK_SOURCE_SHA256:
        log.debug("asyncssh's SSHChannel._deliver_data differs from the one checked (%s): stock window kept",
                  digest[:12])
        return False
    _channel.SSHChannel._deliver_data = _deliver_data  # type: ignore[method-assign]
    _applied = True
    return True


def restore() -> None:
    """Put asyncssh's own method back (tests compare both)."""
    global _applied
    _channel.SSHChannel._deliver_data = _stock_deliver_data  # type: ignore[method-assign]
    _applied = False
