"""Guarded overrides of aiortc's SCTP and DTLS transports that cut the per-packet CPU cost.

A bulk transfer through a tunnel spent most of its CPU in aiortc, not in this project: one SACK
per DATA packet (the receiver built, encrypted and sent it; the sender parsed it and walked its
whole queue of sent chunks looking for retransmissions), a reassembly scan from the start of the
message on every fragment, and an exception per received datagram in the DTLS layer. The
subclasses here do the same protocol work with less of it (docs/UPSTREAM-AIORTC.md):

- delayed SACK (RFC 9260 section 6.2): at least every second packet, within SACK_DELAY_S,
  at once on a gap, a duplicate or a filled gap (fast retransmit stays as prompt as before),
  and a pending SACK rides in the next DATA packet when it fits;
- several chunks per packet up to aiortc's packet size, and a retransmission scan only when
  something may need retransmitting (a SACK with gap blocks or T3 expiry), instead of a walk
  over every outstanding chunk on every SACK;
- in-order TSN bookkeeping and reassembly in O(1) per chunk;
- a message's flush runs when the message is sent, not as a new task on the next loop iteration;
- DTLS: send the record straight to the nominated pair's socket, call OpenSSL without
  pyOpenSSL's success-path checks and without a coroutine per record, and handle a received
  record in the socket callback while the receive task idles (DirectQueue), DTLS datagrams
  demultiplexed by their first byte before aioice's STUN parse (RFC 7983);
- T3 and the delayed SACK as LazyTimer deadlines (no timer made per SACK or per request), and
  the nominated socket's receive buffer sized for SCTP's window.

Each class is used only while every aiortc/aioice method it replaces or relies on has the
source it was written against (sha256, as rtc.py guards its aioice overrides); otherwise, or
with PAM_SCTP_TUNING=0 in the environment when a peer connection is built, the stock classes
are built. The choice is made per transport, so a benchmark can run both side by side.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import inspect
import logging
import os
import socket
import time
from typing import Any

import aioice.ice
import aiortc.rtcdtlstransport as dtls_module
import aiortc.rtcpeerconnection as pc_module
import aiortc.rtcsctptransport as sctp_module
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcsctptransport import (SCTP_DATA_LAST_FRAG, SCTP_MAX_PACKET_LENGTH, DataChunk, InitChunk,
                                     RTCSctpTransport, SackChunk, parse_packet,
                                     tsn_plus_one)
from aiortc.utils import uint32_gt
from google_crc32c import value as crc32c
from OpenSSL import SSL

logger = logging.getLogger(__name__)

ENV = "PAM_SCTP_TUNING"
SACK_EVERY_PACKETS = 2  # RFC 9260 6.2: a SACK for at least every second packet
SACK_DELAY_S = 0.05  # RFC 9260 6.2: at most 200 ms; well under SCTP's 1 s minimum RTO
_PACKET_ROOM = SCTP_MAX_PACKET_LENGTH - 12  # bytes of chunks per packet, after the common header

# What each override was written against: "module.Class.method" -> sha256 of its source.
_KNOWN_SOURCES = {
    "sctp": {
        "RTCSctpTransport.__init__": "294b0e510843850977697fc56059d70ae4f55e28ed88f1d66046e69e648d2c31",
        "RTCSctpTransport._handle_data": "8661b724e20776bbf9af6f68a828cfb952d2deb617d7a9e0f143d641bdae95e2",
        "RTCSctpTransport._send_sack": "ac92513522fa60e7f298fd0e5849dd8b9aa9ac969cf840aa653f96c2de690d43",
        "RTCSctpTransport._transmit": "aa8941d5f8f020e8b4e438e02084533dd78399da498638a013025252e5fe8115",
        "RTCSctpTransport._receive_sack_chunk": "4b35ccf1372cdec8705f378a04de43d9c4ad5675afae09781eddd69ecdb473b1",
        "RTCSctpTransport._t3_expired": "0e759bf4b1b2d8c8afa3d656a8f34839c974d0104cb66f895a9a9d266f6499af",
        "RTCSctpTransport._t3_restart": "abf85ae57b8fa1449570f0290f529b57fe181432e65245d1ca9719584320af8d",
        "RTCSctpTransport._t3_start": "fa045ec7c5fff3d70acdfe21dc70951e4223a8b617cff1a37c1a75b239d9b403",
        "RTCSctpTransport._t3_cancel": "0e0e3e38da2920641aa7c340e3339586db5196ffb2a833c940b08acb8392acf9",
        "RTCSctpTransport._mark_received": "2ac68b6a3934ca87cf9d9383d4dd764a8fbef83c9d06f9a0435bedde7df46499",
        "RTCSctpTransport._receive_chunk": "830bae988365ba89e183334cec6cd47efd03a10909db903e1805d9aad2a5380d",
        "RTCSctpTransport._receive_data_chunk": "790c2bb8cd0f5dd735cb051ac669ccc5749a25965fb19a6aeb740fc861563048",
        "RTCSctpTransport._send_chunk": "eb2f909e3c2ff5cc948062e5eeaee54868455940ea62c6c9162145a4550127e6",
        "RTCSctpTransport._data_channel_send": "bff23b8d60ecb6243e6e6c26883e655caa465eb9ece0ac3e936b5ceadffd7cf2",
        "RTCSctpTransport._data_channel_flush": "d5f055f33db1abff0846e9553f838c9c0703dafee1790835bbf0021af009f8c2",
        "InboundStream.add_chunk": "de934faf324b1b4bfb9ac0c25e221a5babb436944e33f9972ca8f8cee26ee8b7",
        "InboundStream.pop_messages": "bd29de9aa7c4f8fda274a3f62feb85adb80add14f76ca79ad5b53da5cc10f3e3",
    },
    "dtls": {
        "RTCDtlsTransport._send_data": "ee6cd411dd7f8eda6da0344f01b98f3c24ae9072cd3ef36d0a0acdd7a618eb47",
        "RTCDtlsTransport._recv_next": "998076720c05aa13faadff2dfa337f6964c171fa6791789a72693e1480c74102",
        "RTCDtlsTransport._write_ssl": "6573c0237063bdf0df41ede543428ea6e669020e86b93e8484bbac9c9730a54a",
        "Connection.sendto": "bf162ec03bdce2cc2b9602cd47a03aa70b15b45383da4d0618090e65179f7e85",
        "StunProtocol.send_data": "8bfbce074a897482d13dba6bf49ff6f09e48f84327143b801a3a12d2e43de358",
        # the record handed over from the socket callback (DirectQueue)
        "Connection.data_received": "5631b17fab717d6b9a956b775d6f5580a50c2419dc6ef693286a98355e98a253",
        "Connection.recvfrom": "676acc01e4a9a9da04d94d86092a81ba17f1ef77bed0322c8302e3436310e863",
        "RTCDtlsTransport._RTCDtlsTransport__run": "24d63d929a104e16e20d0196590ee21cc41f9d569b134d2779b1d62d876e6815",
        "StunProtocol.datagram_received": "ff4c8b910d45fb3a9e50c4391fe5cbaba33dcba669fea9e847e19a5c99b9bfbb",
        # OpenSSL called through pyOpenSSL's own bindings, as these methods do (without a check per call)
        "SSLConnection.recv": "84b0e9671ae37797ed9604ca3e0001a20882bd7d0051e26a1f4df66aaef06ef4",
        "SSLConnection.send": "3a17d0bf025164cfbbc909c7362fdeb27d1e9f135f3ebaf9ce4376fe5e198625",
        "SSLConnection.bio_write": "2198d63b78ada6dcd59c1e6d6f1b0d80b8f484637acd7633eb14f8d392f6a2a4",
        "SSLConnection.bio_read": "bc83763ed40fc664a3015c30cdd5c5eb65d73cc09783f9686af0d814280825b3",
        "SSLConnection._raise_ssl_error": "04b0d7964c73ea9eb7948883b2bd1c1d7d188ca9b5826f73f339de781868b18f",
    },
}
_OWNERS = {"RTCSctpTransport": sctp_module.RTCSctpTransport, "InboundStream": sctp_module.InboundStream,
           "RTCDtlsTransport": dtls_module.RTCDtlsTransport, "Connection": aioice.ice.Connection,
           "StunProtocol": aioice.ice.StunProtocol, "SSLConnection": SSL.Connection}


def source_hash(qualified: str) -> str:
    """sha256 of the stock source of "Class.method" (empty when it cannot be read)."""
    owner, name = qualified.split(".", 1)
    try:
        return hashlib.sha256(inspect.getsource(getattr(_OWNERS[owner], name)).encode()).hexdigest()
    except (OSError, TypeError, AttributeError):
        return ""


@functools.lru_cache(maxsize=None)
def supported(part: str) -> bool:
    """True when every stock method the `part` ("sctp" or "dtls") override depends on is the known one."""
    return all(source_hash(name) == digest for name, digest in _KNOWN_SOURCES[part].items())


def enabled() -> bool:
    """The run-time switch: PAM_SCTP_TUNING=0 (or off/false/no) builds the stock transports."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def run_now(coro: Any) -> None:
    """Run a coroutine up to its first real suspension now, the rest as a task.

    aiortc's flush path never suspends while the nominated pair is there (every "await" ends in
    a synchronous sendto), so this is a plain call that saves a loop iteration. Should it ever
    suspend, the rest runs as a task, as stock would have run all of it. Failures are logged
    and kept from the caller, as an unawaited stock task's would be."""
    yielded = _advance(coro, "send", None)
    if yielded is not _FINISHED:
        asyncio.ensure_future(_resume(coro, yielded))


_FINISHED = object()  # _advance: the coroutine returned, or failed (logged)


def _advance(coro: Any, method: str, arg: Any) -> Any:
    """One step of `coro` (send or throw): what it waits on next, or _FINISHED."""
    try:
        return getattr(coro, method)(arg)
    except StopIteration:
        return _FINISHED
    except Exception:
        logger.debug("data channel flush failed", exc_info=True)
        return _FINISHED


async def _resume(coro: Any, yielded: Any) -> None:
    while yielded is not _FINISHED:
        try:
            if yielded is None:
                await asyncio.sleep(0)
                value = None
            else:
                value = await yielded
        except BaseException as exc:  # hand the outcome of what it waited on back to it
            yielded = _advance(coro, "throw", exc)
            continue
        yielded = _advance(coro, "send", value)


class LazyTimer:
    """One loop timer for a deadline that moves or clears often (T3 on every SACK, the delayed
    SACK on every request): moving or clearing costs no timer operation; the armed timer re-arms
    itself for the rest when it fires before the deadline, so expiry is as exact as before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Any) -> None:
        self._loop, self._callback = loop, callback
        self.deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fires_at = 0.0

    @property
    def active(self) -> bool:
        return self.deadline is not None

    def set(self, delay: float) -> None:
        deadline = self._loop.time() + delay
        self.deadline = deadline
        if self._handle is None or self._fires_at > deadline + 0.001:
            if self._handle is not None:
                self._handle.cancel()
            self._arm(delay, deadline)

    def clear(self) -> None:
        self.deadline = None

    def _arm(self, delay: float, at: float) -> None:
        self._fires_at = at
        self._handle = self._loop.call_later(delay, self._due)

    def _due(self) -> None:
        self._handle = None
        if self.deadline is None:
            return
        remaining = self.deadline - self._loop.time()
        if remaining > 0.001:
            self._arm(remaining, self.deadline)
            return
        self.deadline = None
        self._callback()


def _build_stock(stock: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    instance = object.__new__(stock)
    instance.__init__(*args, **kwargs)
    return instance


class TunedSctpTransport(RTCSctpTransport):
    """RTCSctpTransport with delayed SACK, bundling and O(1) per-chunk bookkeeping."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if not (enabled() and supported("sctp")):
            return _build_stock(RTCSctpTransport, args, kwargs)
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pam_sack_packets = 0  # packets with DATA since the last SACK
        self._pam_sack_timer = LazyTimer(self._loop, self._pam_sack_due)
        self._pam_retransmit_pending = False  # a chunk may be marked for retransmission
        self._pam_t3 = LazyTimer(self._loop, self._t3_expired)  # T3 (stock's _t3_handle stays None)
        self.pam_sacks_sent = 0  # for tests and benchmarks

    # --- receiving ---------------------------------------------------------------------------

    async def _handle_data(self, data: bytes) -> None:
        """As stock, but the SACK that follows is delayed or bundled where RFC 9260 6.2 allows."""
        try:
            _, _, verification_tag, chunks = parse_packet(data)
        except ValueError:
            return
        if any(isinstance(x, InitChunk) for x in chunks):
            if len(chunks) != 1:
                return
            expected_tag = 0
        else:
            expected_tag = self._local_verification_tag
        if verification_tag != expected_tag:
            return

        had_gap = bool(self._sack_misordered)
        only_data = True
        for chunk in chunks:
            if type(chunk) is DataChunk:  # what stock _receive_chunk dispatches it to, minus its debug line
                await self._receive_data_chunk(chunk)
                continue
            only_data = only_data and not isinstance(chunk, sctp_module.ForwardTsnChunk)
            await self._receive_chunk(chunk)
        if not self._sack_needed:
            return
        self._pam_sack_packets += 1
        if (not only_data or had_gap or self._sack_misordered or self._sack_duplicates
                or self._pam_sack_packets >= SACK_EVERY_PACKETS
                or self._association_state != self.State.ESTABLISHED):
            await self._send_sack()
        elif not self._pam_sack_timer.active:
            self._pam_sack_timer.set(SACK_DELAY_S)

    def _pam_sack_due(self) -> None:
        if self._sack_needed:
            asyncio.ensure_future(self._pam_send_sack_quietly())

    async def _pam_send_sack_quietly(self) -> None:
        try:
            await self._send_sack()
        except ConnectionError:  # the transport closed meanwhile: nothing left to acknowledge
            pass

    def _pam_sack_sent(self) -> None:
        self.pam_sacks_sent += 1
        self._pam_sack_packets = 0
        self._pam_sack_timer.clear()

    async def _send_sack(self) -> None:
        self._pam_sack_sent()
        await super()._send_sack()

    def _pam_sack_bytes(self) -> bytes:
        """The pending SACK as a chunk to bundle (stock _send_sack's content); clears what it reports."""
        if not self._sack_misordered and not self._sack_duplicates:  # in order: SackChunk's bytes, packed once
            return sctp_module.pack("!BBHLLHH", SackChunk.type, 0, 16, self._last_received_tsn,
                                    max(0, self._advertised_rwnd), 0, 0)
        gaps: list[list[int]] = []
        gap_next = None
        for tsn in sorted(self._sack_misordered):
            pos = (tsn - self._last_received_tsn) % sctp_module.SCTP_TSN_MODULO
            if tsn == gap_next:
                gaps[-1][1] = pos
            else:
                gaps.append([pos, pos])
            gap_next = tsn_plus_one(tsn)
        sack = SackChunk()
        sack.cumulative_tsn = self._last_received_tsn
        sack.advertised_rwnd = max(0, self._advertised_rwnd)
        sack.duplicates = self._sack_duplicates[:]
        sack.gaps = [(x[0], x[1]) for x in gaps]
        return bytes(sack)

    def _mark_received(self, tsn: int) -> bool:
        """The next TSN in order with nothing misordered: O(1); anything else: stock."""
        if not self._sack_misordered and tsn == tsn_plus_one(self._last_received_tsn):
            self._last_received_tsn = tsn
            if self._sack_duplicates:
                self._sack_duplicates = [x for x in self._sack_duplicates if uint32_gt(x, tsn)]
            return False
        return super()._mark_received(tsn)

    async def _receive_data_chunk(self, chunk: DataChunk) -> None:
        """As stock, but reassembly is scanned only when this chunk can complete a message:
        it is a last fragment, or it filled a hole (it did not go to the tail)."""
        self._sack_needed = True
        if self._mark_received(chunk.tsn):
            return
        inbound_stream = self._get_inbound_stream(chunk.stream_id)
        reassembly = inbound_stream.reassembly
        to_tail = not reassembly or uint32_gt(chunk.tsn, reassembly[-1].tsn)
        inbound_stream.add_chunk(chunk)
        self._advertised_rwnd -= len(chunk.user_data)
        if (chunk.flags & SCTP_DATA_LAST_FRAG) or not to_tail:
            for message in inbound_stream.pop_messages():
                self._advertised_rwnd += len(message[2])
                await self._receive(*message)
        if self._reconfig_deferred is not None:
            await self._reset_deferred_streams()

    # --- sending -----------------------------------------------------------------------------

    def _data_channel_send(self, channel: Any, data: bytes | str) -> None:
        """Stock, but the flush runs now instead of as a new task on the next loop iteration:
        one hop (and one Task) less per message sent."""
        if data == "":
            pp_id, user_data = sctp_module.WEBRTC_STRING_EMPTY, b"\x00"
        elif isinstance(data, str):
            pp_id, user_data = sctp_module.WEBRTC_STRING, data.encode("utf8")
        elif data == b"":
            pp_id, user_data = sctp_module.WEBRTC_BINARY_EMPTY, b"\x00"
        else:
            pp_id, user_data = sctp_module.WEBRTC_BINARY, data
        if self._remote_max_message_size and len(user_data) > self._remote_max_message_size:
            raise ValueError(
                f"Cannot send message of {len(user_data)} bytes, the remote party "
                f"only supports messages up to {self._remote_max_message_size} bytes")
        channel._addBufferedAmount(len(user_data))
        self._data_channel_queue.append((channel, pp_id, user_data))
        run_now(self._data_channel_flush())


    async def _receive_sack_chunk(self, chunk: SackChunk) -> None:
        if chunk.gaps:  # only gap blocks strike chunks for fast retransmission
            self._pam_retransmit_pending = True
        await super()._receive_sack_chunk(chunk)

    def _t3_expired(self) -> None:
        self._pam_retransmit_pending = True
        super()._t3_expired()

    def _t3_start(self) -> None:
        self._pam_t3.set(self._rto)

    def _t3_restart(self) -> None:
        """Stock cancels the timer and arms a new one on every SACK that acknowledges the earliest
        chunk (and stops and starts it on every request/response): here that moves a deadline."""
        self._pam_t3.set(self._rto)

    def _t3_cancel(self) -> None:
        self._pam_t3.clear()

    def _pam_packet(self, chunks: list[bytes]) -> bytes:
        """One SCTP packet of serialized chunks, led by the pending SACK when it fits."""
        body = b"".join(chunks)
        if self._sack_needed:
            sack = self._pam_sack_bytes()
            if len(sack) + len(body) <= _PACKET_ROOM:
                body = sack + body
                self._sack_duplicates.clear()
                self._sack_needed = False
                self._pam_sack_sent()
        header = sctp_module.pack("!HHL", self._local_port, self._remote_port, self._remote_verification_tag)
        checksum = crc32c(header + b"\x00\x00\x00\x00" + body)
        return header + sctp_module.pack("<L", checksum) + body

    async def _pam_send_packets(self, packets: list[list[bytes]]) -> None:
        """Send packets in order; through a tuned DTLS transport without a coroutine per packet."""
        dtls = self._RTCSctpTransport__transport
        tuned = isinstance(dtls, TunedDtlsTransport)
        for chunks in packets:
            data = self._pam_packet(chunks)
            if not tuned:
                await dtls._send_data(data)
                continue
            record = dtls._pam_send_now(data)
            if record:
                await dtls._pam_send_stock(record)

    async def _transmit(self) -> None:
        """Stock _transmit, with the retransmission scan skipped when nothing can be marked and
        consecutive chunks bundled into one packet."""
        if self._forward_tsn_chunk is not None:
            await self._send_chunk(self._forward_tsn_chunk)
            self._forward_tsn_chunk = None
            if not self._pam_t3.active:
                self._t3_start()

        if self._fast_recovery_exit is not None:
            burst_size = 2 * sctp_module.USERDATA_MAX_LENGTH
        else:
            burst_size = 4 * sctp_module.USERDATA_MAX_LENGTH
        cwnd = min(self._flight_size + burst_size, self._cwnd)

        packets: list[list[bytes]] = []
        room = 0  # what the last packet of `packets` can still take

        def add(chunk: DataChunk) -> None:
            nonlocal room
            data = bytes(chunk)
            if not packets or len(data) > room:
                packets.append([data])
                room = _PACKET_ROOM - len(data)
            else:
                packets[-1].append(data)
                room -= len(data)

        if self._pam_retransmit_pending:
            retransmit_earliest = True
            for chunk in self._sent_queue:
                if chunk._retransmit:
                    if self._fast_recovery_transmit:
                        self._fast_recovery_transmit = False
                    elif self._flight_size >= cwnd:
                        if packets:
                            await self._pam_send_packets(packets)
                        return
                    self._flight_size_increase(chunk)
                    chunk._misses = 0
                    chunk._retransmit = False
                    chunk._sent_count += 1
                    add(chunk)
                    if retransmit_earliest:
                        self._t3_restart()
                retransmit_earliest = False
            self._pam_retransmit_pending = False  # every marked chunk went out

        while self._outbound_queue and self._flight_size < cwnd:
            chunk = self._outbound_queue.popleft()
            self._sent_queue.append(chunk)
            self._flight_size_increase(chunk)
            chunk._sent_count += 1
            chunk._sent_time = time.time()
            add(chunk)
            if not self._pam_t3.active:
                self._t3_start()
        if packets:
            await self._pam_send_packets(packets)


_SSL_LIB, _SSL_FFI = SSL._lib, SSL._ffi  # what pyOpenSSL's Connection methods call


RECEIVE_BUFFER = 2 * 1024 * 1024  # bytes asked for: ~ SCTP's 1 MiB window in datagrams (the kernel caps it)


def _size_receive_buffer(protocol: Any) -> None:
    """Let the nominated socket hold SCTP's receive window. aiortc's sender is paced by its
    congestion window alone, which grows past what aioice's 256 KiB socket buffer holds in
    datagrams (the kernel charges each ~1.2 KB datagram a few KB); every datagram beyond is
    dropped by the kernel and must be retransmitted."""
    transport = getattr(protocol, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(protocol, "_pam_buffer_sized", False):
        return
    protocol._pam_buffer_sized = True
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RECEIVE_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        pass


def _demux_dtls_first(protocol: Any) -> None:
    """Hand DTLS datagrams (first byte 20-63, RFC 7983) of an aioice StunProtocol straight to its
    connection; stock parses every datagram as STUN first and catches the failure."""
    if type(protocol) is not aioice.ice.StunProtocol or "datagram_received" in vars(protocol):
        return
    stock = protocol.datagram_received
    receiver, component = protocol.receiver, protocol.local_candidate.component

    def datagram_received(data: bytes, addr: Any) -> None:
        if data and 19 < data[0] < 64:
            receiver.data_received(data, component)
        else:
            stock(data, addr)
    protocol.datagram_received = datagram_received


class DirectQueue(asyncio.Queue):  # type: ignore[type-arg]
    """aioice's queue of received datagrams, which first offers each datagram to `consumer`.

    Stock, a datagram goes from the socket callback onto this queue and the DTLS transport's
    receive task takes it on a later loop iteration: one hop per datagram. While that task is
    idle and nothing is queued, the consumer handles the record in the socket callback itself;
    anything else (the end-of-connection None, a busy or not yet connected transport) is queued
    as stock, so the order of records never changes."""

    consumer: Any = None  # callable((data, component)) -> bool: True when it took the datagram

    def put_nowait(self, item: Any) -> None:
        consumer = self.consumer
        if consumer is not None and item is not None and self.empty() and consumer(item):
            return
        super().put_nowait(item)


class TunedDtlsTransport(RTCDtlsTransport):
    """RTCDtlsTransport that sends records straight to the nominated pair, skips empty reads and
    handles a received record in the socket callback when its receive task is idle."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if not (enabled() and supported("dtls")):
            return _build_stock(RTCDtlsTransport, args, kwargs)
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pam_idle = False  # the receive task waits on an empty queue
        self._pam_backlog: collections.deque[bytes] | None = None  # records behind a suspended one
        self.pam_direct_records = 0  # for tests and benchmarks
        self._pam_rx_buffer = _SSL_FFI.new("char[]", 1500)  # per transport: cffi calls drop the GIL
        self._pam_tx_buffer = _SSL_FFI.new("char[]", 1500)
        self._pam_pair: Any = None  # the nominated pair _pam_udp and _pam_addr belong to
        self._pam_udp: Any = None
        self._pam_addr: Any = None

    # --- receiving ---------------------------------------------------------------------------

    async def _recv_next(self) -> None:
        """Stock until the handshake is done; then the same receive, with the queue handed to
        the socket callback (`_pam_direct`) while this task waits on it."""
        if not self._RTCDtlsTransport__handshake_done or self._state != State.CONNECTED:
            return await super()._recv_next()
        connection = self.transport._connection
        queue = connection._queue
        if type(queue) is asyncio.Queue and queue.empty():  # noqa: E721 - exactly stock's queue
            queue = connection._queue = DirectQueue()
        if isinstance(queue, DirectQueue):
            queue.consumer = self._pam_direct
        pair = connection._nominated.get(1)
        if pair is not None:
            _demux_dtls_first(pair.protocol)
            _size_receive_buffer(pair.protocol)
        self._pam_idle = True
        try:
            data = await self.transport._recv()
        finally:
            self._pam_idle = False
        await self._pam_handle_datagram(data)

    async def _pam_handle_datagram(self, data: bytes) -> None:
        """Stock _recv_next's handling of one datagram once the handshake is done."""
        self._RTCDtlsTransport__rx_bytes += len(data)
        self._RTCDtlsTransport__rx_packets += 1
        first_byte = data[0]
        if 19 < first_byte < 64:
            self._pam_bio_write(data)
            try:
                record: bytes | None = self._pam_ssl_recv()
            except SSL.ZeroReturnError:
                record = None
            except SSL.Error:
                record = b""
            output = self._pam_take_output()  # _write_ssl, without a coroutine when nothing is due
            if output and not self._pam_sendto_now(output):
                await self._pam_send_stock(output)
            if record is None:
                raise ConnectionError  # the remote shut DTLS down: the receive task ends, as stock
            if record and self._data_receiver:
                await self._data_receiver._handle_data(record)
        elif 127 < first_byte < 192 and self._rx_srtp:  # SRTP / SRTCP (media): stock's code
            arrival_time_ms = dtls_module.clock.current_ms()
            try:
                if dtls_module.is_rtcp(data):
                    await self._handle_rtcp_data(self._rx_srtp.unprotect_rtcp(data))
                else:
                    await self._handle_rtp_data(self._rx_srtp.unprotect(data), arrival_time_ms=arrival_time_ms)
            except dtls_module.pylibsrtp.Error:
                pass

    def _pam_direct(self, item: tuple[bytes, int]) -> bool:
        """The socket callback's offer of one datagram: take a DTLS record while the receive task idles."""
        data = item[0]
        if self._pam_backlog is not None:  # a record before this one is still being handled
            self._pam_backlog.append(data)
            return True
        if not (self._pam_idle and data and 19 < data[0] < 64 and self._state == State.CONNECTED):
            return False
        self.pam_direct_records += 1
        self._pam_backlog = collections.deque()
        run_now(self._pam_direct_records_from(data))
        return True

    async def _pam_direct_records_from(self, data: bytes) -> None:
        """Handle `data`, then whatever arrived while it was suspended, in order; a failure ends
        the receive task as stock's would (the end-of-connection marker goes on the queue)."""
        backlog = self._pam_backlog
        assert backlog is not None
        try:
            while True:
                await self._pam_handle_datagram(data)
                if not backlog:
                    break
                data = backlog.popleft()
        except ConnectionError:
            self._pam_end_receiving()
        except Exception:
            logger.warning("DTLS record handling failed", exc_info=True)
            self._pam_end_receiving()
        finally:
            self._pam_backlog = None

    def _pam_end_receiving(self) -> None:
        queue = self.transport._connection._queue
        asyncio.Queue.put_nowait(queue, None)  # recvfrom raises ConnectionError in the receive task

    # --- OpenSSL through pyOpenSSL's bindings, without its per-call checks on success -------------

    def _pam_take_output(self) -> bytes:
        """Stock `bio_read(1500)` of what OpenSSL left to send; b"" when the BIO is empty (where
        pyOpenSSL raises, caught by stock once per datagram)."""
        size = _SSL_LIB.BIO_read(self._ssl._from_ssl, self._pam_tx_buffer, 1500)
        return _SSL_FFI.buffer(self._pam_tx_buffer, size)[:] if size > 0 else b""

    def _pam_ssl_recv(self) -> bytes:
        """Stock `recv(1500)`: the checks that follow a failed read are pyOpenSSL's own."""
        connection = self._ssl
        size = _SSL_LIB.SSL_read(connection._ssl, self._pam_rx_buffer, 1500)
        if size > 0:
            return _SSL_FFI.buffer(self._pam_rx_buffer, size)[:]
        connection._raise_ssl_error(connection._ssl, size)
        return b""

    def _pam_bio_write(self, data: bytes) -> None:
        connection = self._ssl
        size = _SSL_LIB.BIO_write(connection._into_ssl, data, len(data))
        if size <= 0:
            connection._handle_bio_errors(connection._into_ssl, size)

    def _pam_ssl_send(self, data: bytes) -> None:
        connection = self._ssl
        size = _SSL_LIB.SSL_write(connection._ssl, data, len(data))
        if size <= 0:
            connection._raise_ssl_error(connection._ssl, size)

    # --- sending -----------------------------------------------------------------------------

    def _pam_sendto_now(self, data: bytes) -> bool:
        """Send a record straight to the nominated pair's UDP socket; False: use the stock path."""
        connection = self._transport._connection
        connection._pam_last_sent = time.monotonic()  # for idle_consent: is our traffic answered?
        pair = connection._nominated.get(1)
        if pair is not self._pam_pair:  # looked up once per nominated pair
            self._pam_pair = pair
            transport = getattr(pair.protocol, "transport", None) if pair is not None else None
            # Straight to a UDP socket only: a TURN-relayed pair's TurnTransport has no is_closing()
            # and must wrap the record in a Send indication, which the stock path does.
            self._pam_udp = transport if getattr(transport, "is_closing", None) is not None else None
            self._pam_addr = pair.remote_addr if pair is not None else None
        transport = self._pam_udp
        if transport is None or transport.is_closing():
            return False
        transport.sendto(data, self._pam_addr)
        self._RTCDtlsTransport__tx_bytes += len(data)
        self._RTCDtlsTransport__tx_packets += 1
        return True

    async def _pam_send_stock(self, data: bytes) -> None:
        await self.transport._send(data)  # raises ConnectionError when not connected
        self._RTCDtlsTransport__tx_bytes += len(data)
        self._RTCDtlsTransport__tx_packets += 1

    async def _write_ssl(self) -> None:
        data = self._pam_take_output()
        if data and not self._pam_sendto_now(data):
            await self._pam_send_stock(data)

    def _pam_send_now(self, data: bytes) -> bytes:
        """_send_data without a coroutine: encrypt and send; returns b"", or the record that the
        stock path must still send (no nominated UDP socket)."""
        if self._state != State.CONNECTED:
            raise ConnectionError("Cannot send encrypted data, not connected")
        self._pam_ssl_send(data)
        record = self._pam_take_output()
        if record and not self._pam_sendto_now(record):
            return record
        return b""

    async def _send_data(self, data: bytes) -> None:
        record = self._pam_send_now(data)
        if record:
            await self._pam_send_stock(record)


def is_tuned(channel: Any) -> bool:
    """Whether a data channel runs on a tuned transport: the pumps' direct paths follow the same
    switch, so PAM_SCTP_TUNING=0 also gives the old task-per-hop pumps."""
    return isinstance(getattr(channel, "transport", None), TunedSctpTransport)


def install() -> None:
    """Make RTCPeerConnection build the tuned transports (each falls back to stock by itself)."""
    if pc_module.RTCSctpTransport is RTCSctpTransport:
        pc_module.RTCSctpTransport = TunedSctpTransport
    if pc_module.RTCDtlsTransport is RTCDtlsTransport:
        pc_module.RTCDtlsTransport = TunedDtlsTransport
