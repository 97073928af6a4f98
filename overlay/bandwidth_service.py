"""The bandwidth test on a Host: the node's handler (`BandwidthTestService`) and the tester
(`measure_link`). The rules are overlay/bandwidth.py's; this module only moves bytes and
reads the clock.

The test runs through the same encrypted, multiplexed connection that hidden states use, so it
measures what they will get: the link, and also the cost of Noise encryption and of the
multiplexer's flow control (on loopback that cost is the whole figure).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from overlay.bandwidth import (
    BAD_REQUEST,
    BUSY,
    CHUNK_BYTES,
    DOWNLOAD,
    MAX_REQUEST_BYTES,
    MAX_TRANSFER_SECONDS,
    METHOD,
    UPLOAD,
    BandwidthTestError,
    GateConfig,
    LinkMeasurement,
    SpeedTestConfig,
    TransferGate,
    TransferSizer,
    decode_received,
    decode_request,
    encode_received,
    encode_request,
)
from overlay.host import Host, RpcContext
from overlay.identity import PeerId
from overlay.rpc_codec import RemoteError, reset_reason
from overlay.streams import ConnectionLost, Stream, StreamClosed

log = logging.getLogger("overlay.bandwidth")

_ZEROS = memoryview(bytes(CHUNK_BYTES))  # what is sent: encrypted on the wire, so never sparse
BUSY_RETRY_DELAY = (0.05, 0.2)  # seconds before asking a busy peer again, uniform
# PROTOCOL.md (6): bulk messages carry at most CHUNK_BYTES; a larger one is refused as it
# arrives, not buffered whole first (up to the host's max_message_size, 256 MiB).
_CHUNK_REASON = reset_reason(BAD_REQUEST, f"bandwidth-test messages carry at most "
                                          f"{CHUNK_BYTES} bytes")
_REQUEST_REASON = reset_reason(BAD_REQUEST, f"a request map has at most {MAX_REQUEST_BYTES} "
                                            "bytes")
_FAILURES = (RemoteError, ConnectionLost, StreamClosed, BandwidthTestError, TimeoutError, OSError)


class BandwidthTestService:
    """The node side: sinks uploads, sources downloads, one transfer at a time."""

    def __init__(self, config: GateConfig | None = None):
        self.gate = TransferGate(config, now=time.monotonic())
        self.transfers = 0  # completed, for logs and tests

    def attach(self, host: Host) -> None:
        host.add_stream_handler(METHOD, self._handle)

    async def _handle(self, ctx: RpcContext, stream: Stream) -> None:
        limit = self.gate.config.max_transfer_seconds
        try:
            # (bounded: a tester that opened streams and sent no request held them, and a
            # task each, for as long as its connection lasted; the uploaded chunks right
            # behind the request are judged by their own bound, read or not: see below)
            stream.bound_messages(CHUNK_BYTES, _CHUNK_REASON,
                                  first=(MAX_REQUEST_BYTES, _REQUEST_REASON))
            async with asyncio.timeout(limit):
                message = await stream.recv()
            request = decode_request(message, self.gate.config.max_transfer_bytes)
        except TimeoutError:
            raise RemoteError("deadline_exceeded", f"no request within {limit:g} s") from None
        except BandwidthTestError as e:
            raise RemoteError(e.code, str(e)) from None
        refused = self.gate.admit(request.nbytes, time.monotonic())
        if refused is not None:
            raise RemoteError(*refused)
        try:
            async with asyncio.timeout(limit):
                if request.op == UPLOAD:
                    received = await self._sink(stream, request.nbytes)
                else:
                    await self._source(stream, request.nbytes)
        except TimeoutError:
            raise RemoteError("deadline_exceeded",
                              f"a bandwidth test may take at most {limit:g} s") from None
        finally:
            self.gate.release()
        self.transfers += 1
        log.debug("bandwidth test: %s of %d bytes for %s", request.op, request.nbytes,
                  ctx.peer.short())
        if request.op == UPLOAD:
            # released before answering: the tester's next transfer finds the slot free
            await stream.send(encode_received(received), end_stream=True)

    @staticmethod
    async def _sink(stream: Stream, nbytes: int) -> int:
        received = 0
        while (message := await stream.recv_buffer()) is not None:  # (no bytes copy)
            received += len(message)
            message.release()  # its buffer may serve the next chunk
            if received > nbytes:
                raise RemoteError(BAD_REQUEST, f"more than the {nbytes} bytes announced")
        return received

    @staticmethod
    async def _source(stream: Stream, nbytes: int) -> None:
        sent = 0
        while sent < nbytes:
            size = min(CHUNK_BYTES, nbytes - sent)
            await stream.send(_ZEROS[:size])
            sent += size


async def measure_link(host: Host, peers: Sequence[PeerId],
                       config: SpeedTestConfig | None = None
                       ) -> tuple[LinkMeasurement | None, list[str]]:
    """Test the link against `peers` in order (at most `config.max_peers`) until one answers
    the whole test; a transfer refused as `busy` is asked again after a short pause.
    Returns (the measurement or None, why each failed attempt failed). Bounded: about
    `time_budget` seconds of transfers, and twice that in all."""
    config = config or SpeedTestConfig()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * config.time_budget
    candidates = list(dict.fromkeys(p for p in peers if p != host.peer_id))
    failures: list[str] = []
    for peer in candidates[:config.max_peers]:
        try:
            async with asyncio.timeout_at(deadline):
                return await _measure_peer(host, peer, config), failures
        except _FAILURES as e:
            if isinstance(e, TimeoutError) and not str(e):
                e = TimeoutError(f"no whole test within {2 * config.time_budget:g} s")
            failures.append(f"{peer.short()}: {str(e) or type(e).__name__}")
            if loop.time() >= deadline:
                break
    return None, failures


async def _measure_peer(host: Host, peer: PeerId, config: SpeedTestConfig) -> LinkMeasurement:
    began = time.perf_counter()
    rtt = await host.round_trip(str(peer), timeout=config.time_budget)
    if rtt is None:
        raise ConnectionLost("unreachable")
    start = time.perf_counter()
    up = TransferSizer(config, deadline=start + config.time_budget / 2)
    while (size := up.next_size(time.perf_counter())) is not None:
        up.record(size, await _when_free(_upload, host, peer, size), rtt)
    down = TransferSizer(config, deadline=start + config.time_budget)
    while (size := down.next_size(time.perf_counter())) is not None:
        down.record(size, await _when_free(_download, host, peer, size), rtt)
    assert up.bps is not None and down.bps is not None  # the probes always run
    return LinkMeasurement(str(peer), up.bps, down.bps, rtt, up.total_bytes + down.total_bytes,
                           time.perf_counter() - began)


async def _when_free(transfer, host: Host, peer: PeerId, nbytes: int) -> float:
    """`transfer`, asked again after a short random pause while the node is busy with another
    tester's transfer (the caller's deadline bounds the waiting)."""
    while True:
        try:
            return await transfer(host, peer, nbytes)
        except RemoteError as e:
            if e.code != BUSY:
                raise
        await asyncio.sleep(random.uniform(*BUSY_RETRY_DELAY))


async def _upload(host: Host, peer: PeerId, nbytes: int) -> float:
    """Seconds from the request to the node's count of the `nbytes` it received."""
    began = time.perf_counter()
    stream = await host.open_stream(peer, METHOD, timeout=MAX_TRANSFER_SECONDS)
    try:
        try:
            stream.send_nowait(encode_request(UPLOAD, nbytes), flush=False)
            sent = 0
            while sent < nbytes:
                size = min(CHUNK_BYTES, nbytes - sent)
                await stream.send(_ZEROS[:size])
                sent += size
            await stream.close()
        except (StreamClosed, RemoteError):
            pass  # the node reset the stream (busy, say): recv() raises its reason
        received = decode_received(await stream.recv())
    except BaseException:
        stream.reset("cancel: the tester gave up")
        raise
    elapsed = time.perf_counter() - began
    if received != nbytes:
        raise BandwidthTestError(BAD_REQUEST, f"the node counted {received} of {nbytes} bytes")
    return elapsed


async def _download(host: Host, peer: PeerId, nbytes: int) -> float:
    """Seconds from the request to the last of the `nbytes` the node sends."""
    began = time.perf_counter()
    stream = await host.open_stream(peer, METHOD, timeout=MAX_TRANSFER_SECONDS)
    try:
        await stream.send(encode_request(DOWNLOAD, nbytes), end_stream=True)
        stream.bound_messages(CHUNK_BYTES, _CHUNK_REASON)
        received = 0
        while received < nbytes and (message := await stream.recv_buffer()) is not None:
            received += len(message)
            message.release()  # its buffer may serve the next chunk
        elapsed = time.perf_counter() - began
        if received != nbytes:
            raise BandwidthTestError(BAD_REQUEST, f"the node sent {received} of {nbytes} bytes")
        if await stream.recv() is not None:  # then its end, so the stream is released
            raise BandwidthTestError(BAD_REQUEST, f"the node sent more than {nbytes} bytes")
    except BaseException:
        stream.reset("cancel: the tester gave up")
        raise
    return elapsed
