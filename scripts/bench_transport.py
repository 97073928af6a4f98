#!/usr/bin/env python3
"""Transport benchmark (issue 2): our encrypted, multiplexed connection against plain asyncio TCP.

Client (this process) and server (a subprocess) talk over 127.0.0.1, in the same layout for
ours and for the baseline, in one run:
  * throughput of `--mib` MiB sent as 4 MiB messages (encrypted stream vs plain TCP stream;
    each receiver delivers every message as one buffer: ours through `Stream.recv_buffer`,
    plain TCP read by the kernel straight into a buffer of the message's size);
  * single-core ChaCha20-Poly1305 throughput of `cryptography` on 64 KiB records (the ceiling
    for one encrypted stream), measured in every round between the transfers;
  * the floor: the same records and frames (one DATA frame of 65509 bytes per Noise record)
    written and read by the least Python there can be (blocking sockets, one loop per side,
    records decrypted straight into each message's buffer): what any implementation of this
    wire format with this AEAD library can reach in this layout on this machine;
  * round-trip latency of 1 KiB unary RPCs vs a plain asyncio TCP echo.
Prints a table, then one JSON object as the last line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_transport.py [--mib 256] [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from functools import partial

from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.host import Host
from overlay.record_layer import SEALED_RECORD_PLAINTEXT
from overlay.runtime import keep_large_buffers_in_heap, new_event_loop

MESSAGE = 4 << 20
SMALL = 1024
_LEN = struct.Struct(">I")
# The floor's records: as ours (overlay/PROTOCOL.md, 2 and 3), a 2-byte length, then the
# ciphertext of a 10-byte DATA frame header and up to 65509 payload bytes, then the tag.
_RECORD_LEN = struct.Struct(">H")
_FRAME = struct.Struct(">BBII")
_NONCE = struct.Struct("<4xQ")
_FLOOR_PAYLOAD = SEALED_RECORD_PLAINTEXT - _FRAME.size  # records as large as ours


class RawSink(asyncio.BufferedProtocol):
    """The plain-TCP receiver of the throughput baseline: after its 5-byte header, each
    message is read by the kernel straight into one buffer of its size (as ours hands every
    message over in one buffer, which it reuses for the next message once the application
    has dropped it: so does this sink); kind 2 asks for the answer b"ok"."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.header = memoryview(bytearray(5))
        self.target, self.pos, self.received = self.header, 0, 0
        self.spare = memoryview(b"")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos < len(self.target):
            return
        if self.target is not self.header:  # a whole message, delivered as one buffer
            self.received += len(self.target)
            self.target, self.pos = self.header, 0
            return
        kind, size = self.header[0], _LEN.unpack_from(self.header, 1)[0]
        self.pos = 0
        if kind == 2:
            self.transport.write(b"ok")
        elif size:
            if len(self.spare) != size:
                self.spare = memoryview(bytearray(size))
            self.target = self.spare


# ---------------------------------------------------------------------------- server process
async def serve() -> None:
    host = Host()
    [addr] = await host.listen("/ip4/127.0.0.1/tcp/0")

    async def echo(ctx, payload: bytes) -> bytes:
        return payload

    async def sink(ctx, stream) -> None:
        total = 0
        while (message := await stream.recv_buffer()) is not None:
            total += len(message)
            message.release()  # done with it (its buffer may serve a later message)
        await stream.send(str(total).encode())

    host.add_handler("echo", echo)
    host.add_stream_handler("sink", sink)

    async def raw_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # the echo of the latency baseline
            while True:
                header = await reader.readexactly(5)
                writer.write(header + await reader.readexactly(_LEN.unpack_from(header, 1)[0]))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    raw = await asyncio.start_server(raw_client, "127.0.0.1", 0)
    raw_port = raw.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(RawSink, "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    floor = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=floor_receiver, args=(floor,), daemon=True).start()
    print(f"{addr} {raw_port} {sink_port} {floor.getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().connect_read_pipe(asyncio.Protocol, sys.stdin)
    await asyncio.Event().wait()


def floor_receiver(listener: socket.socket) -> None:
    """The floor's receiving side (a thread of the server process, whose event loop is idle
    meanwhile): reads records into a 1 MiB buffer and decrypts each straight into its
    message's buffer, the frame header landing on the 10 bytes before the payload's place
    (saved and put back); answers the total when the sender half-closes."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    while True:
        sock, _ = listener.accept()
        with sock:
            key = sock.recv(32, socket.MSG_WAITALL)
            aead = ChaCha20Poly1305(key)
            buf = memoryview(bytearray(1 << 20))
            start = end = nonce = received = 0
            message = memoryview(bytearray(_FRAME.size + MESSAGE))
            filled = 0
            while k := sock.recv_into(buf[end:]):
                end += k
                while end - start >= 2:
                    (length,) = _RECORD_LEN.unpack_from(buf, start)
                    stop = start + 2 + length
                    if stop > end:
                        break
                    saved = bytes(message[filled:filled + _FRAME.size])
                    target = message[filled:filled + length - 16]
                    aead.decrypt_into(_NONCE.pack(nonce), buf[start + 2:stop], None, target)
                    nonce += 1
                    _, flags, _, size = _FRAME.unpack_from(target)
                    message[filled:filled + _FRAME.size] = saved
                    filled += size
                    if flags & 0x04:  # END: the message is whole (and dropped, as in ours)
                        received += filled
                        filled = 0
                    start = stop
                if start == end:
                    start = end = 0
                elif len(buf) - end < 70000:
                    buf[:end - start] = bytes(buf[start:end])
                    start, end = 0, end - start
            # (the sender half-closed)
            sock.sendall(str(received).encode())


def floor_throughput(port: int, total: int) -> float:
    """The floor's sending side: frames and seals each record in one loop, 1 MiB per
    sendall, blocking (nothing else runs in this process meanwhile)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = os.urandom(32)
    aead = ChaCha20Poly1305(key)
    payload = memoryview(os.urandom(MESSAGE))
    plain = memoryview(bytearray(_FRAME.size + _FLOOR_PAYLOAD))
    out = memoryview(bytearray((1 << 20) + 65537))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(key)
        nonce = 0
        start = time.perf_counter()
        for _ in range(total // MESSAGE):
            offset = pos = 0
            while offset < MESSAGE:
                size = min(_FLOOR_PAYLOAD, MESSAGE - offset)
                last = offset + size == MESSAGE
                _FRAME.pack_into(plain, 0, 0, 0x04 if last else 0, 1, size)
                plain[_FRAME.size:_FRAME.size + size] = payload[offset:offset + size]
                _RECORD_LEN.pack_into(out, pos, _FRAME.size + size + 16)
                end = pos + 2 + _FRAME.size + size + 16
                aead.encrypt_into(_NONCE.pack(nonce), plain[:_FRAME.size + size], None,
                                  out[pos + 2:end])
                nonce += 1
                offset += size
                pos = end
                if pos > 1 << 20 or last:
                    sock.sendall(out[:pos])
                    pos = 0
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(64)
        elapsed = time.perf_counter() - start
    assert int(answer) == total, answer
    return total / elapsed / 2**20


# ---------------------------------------------------------------------------- client side
async def ours_throughput(host: Host, addr, total: int) -> float:
    payload = os.urandom(MESSAGE)
    stream = await host.open_stream(addr, "sink")
    start = time.perf_counter()
    for _ in range(total // MESSAGE):
        await stream.send(payload)
    await stream.close()
    answer = await stream.recv()
    elapsed = time.perf_counter() - start
    assert int(answer) == total, answer
    return total / elapsed / 2**20


async def raw_throughput(port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(MESSAGE)
    start = time.perf_counter()
    for _ in range(total // MESSAGE):
        writer.write(b"\x01" + _LEN.pack(MESSAGE))
        writer.write(payload)
        await writer.drain()
    writer.write(b"\x02" + _LEN.pack(0))
    await reader.readexactly(2)
    elapsed = time.perf_counter() - start
    writer.close()
    return total / elapsed / 2**20


async def ours_latency(host: Host, addr, calls: int) -> list[float]:
    payload = os.urandom(SMALL)
    for _ in range(200):
        await host.call(addr.peer_id, "echo", payload)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await host.call(addr.peer_id, "echo", payload)
        out.append(time.perf_counter() - start)
    return out


async def raw_latency(port: int, calls: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    import socket

    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"\x00" + _LEN.pack(SMALL) + os.urandom(SMALL)
    out = []
    for i in range(calls + 200):
        start = time.perf_counter()
        writer.write(message)
        await reader.readexactly(len(message))
        if i >= 200:
            out.append(time.perf_counter() - start)
    writer.close()
    return out


def aead_throughput(seconds: float = 1.0) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(os.urandom(32))
    record = os.urandom(64 << 10)
    nonce = bytes(12)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(64):
            aead.encrypt(nonce, record, None)
        done += 64 * len(record)
    return done / elapsed / 2**20


def aead_record_sizes(sizes: list[int]) -> None:
    """Prints CPU seconds per GiB to seal and to open records of each plaintext size (the
    measurement behind overlay.record_layer.SEALED_RECORD_PLAINTEXT)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    source = memoryview(bytearray(os.urandom(max(sizes) + 16)))
    target = memoryview(bytearray(max(sizes) + 16))
    print(f"{'plaintext bytes':>16}{'mod 128':>9}{'seal s/GiB':>12}{'open s/GiB':>12}")
    for size in sizes:
        plain, sealed = source[:size], target[:size + 16]
        ciphertext = aead.encrypt(nonce, plain, None)
        best = []
        for job in (partial(aead.encrypt_into, nonce, plain, None, sealed),
                    partial(aead.decrypt_into, nonce, ciphertext, None, sealed[:size])):
            rounds = []
            for _ in range(5):
                start = time.process_time()
                for _ in range(256):
                    job()
                rounds.append((time.process_time() - start) / (256 * size) * 2**30)
            best.append(min(rounds))
        print(f"{size:>16}{size % 128:>9}{best[0]:>12.3f}{best[1]:>12.3f}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of a process so far, from the scheduler's
    nanosecond counters (Linux)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


async def measured(transfer, server_pid: int, total: int, cpu: dict, name: str) -> float:
    """Runs one transfer (a coroutine or a plain call); keeps each side's CPU seconds per GiB
    (the least over the rounds) in `cpu`."""
    sender, receiver = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
    result = transfer()
    if asyncio.iscoroutine(result):
        result = await result
    gib = total / 2**30
    for side, start, pid in (("sender", sender, os.getpid()), ("receiver", receiver, server_pid)):
        key = f"{name}_{side}_cpu_s_per_gib"
        cpu[key] = round(min(cpu.get(key, 1e9), (cpu_seconds(pid) - start) / gib), 3)
    return result


async def client(args: argparse.Namespace) -> dict:
    flags = ["--glibc-defaults"] if args.glibc_defaults else []
    server = subprocess.Popen([sys.executable, __file__, "--serve", *flags], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        addr_text, port_text, sink_text, floor_text = server.stdout.readline().split()
        from overlay.multiaddr import Multiaddr

        addr, port = Multiaddr.parse(addr_text), int(port_text)
        sink_port, floor_port = int(sink_text), int(floor_text)
        host = Host()
        await host.connect(addr)
        total = args.mib << 20
        # Alternate ours and the baselines, best of `repeat`, so drift hits all alike. The AEAD
        # ceiling is measured in each round too, between the transfers (the machine is shared:
        # a ceiling measured at another moment than the transfer would skew the ratio).
        enc, raw, aead, floor, rpc, echo = [], [], [], [], [], []
        cpu: dict = {}
        for _ in range(args.repeat):
            enc.append(await measured(lambda: ours_throughput(host, addr, total), server.pid,
                                      total, cpu, "encrypted"))
            aead.append(aead_throughput(0.3))
            raw.append(await measured(lambda: raw_throughput(sink_port, total), server.pid,
                                      total, cpu, "raw_tcp"))
            floor.append(await measured(lambda: floor_throughput(floor_port, total), server.pid,
                                        total, cpu, "floor"))
            rpc.extend(await ours_latency(host, addr, args.calls // args.repeat))
            echo.extend(await raw_latency(port, args.calls // args.repeat))
        await host.close()
    finally:
        server.kill()
        server.wait(timeout=10)
    return {
        "encrypted_mib_s": round(max(enc), 1),
        "raw_tcp_mib_s": round(max(raw), 1),
        "aead_mib_s": round(max(aead), 1),
        "floor_mib_s": round(max(floor), 1),
        "rpc_p50_us": round(statistics.median(rpc) * 1e6, 1),
        "rpc_p99_us": round(percentile(rpc, 0.99) * 1e6, 1),
        "raw_echo_p50_us": round(statistics.median(echo) * 1e6, 1),
        "raw_echo_p99_us": round(percentile(echo, 0.99) * 1e6, 1),
        **cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=positive_int, default=256, help="MiB per throughput run")
    parser.add_argument("--calls", type=positive_int, default=3000, help="RPCs per latency run")
    parser.add_argument("--repeat", type=positive_int, default=3, help="alternating runs of each")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="keep glibc's default malloc thresholds (overlay-node processes "
                             "keep large buffers in the heap; both sides of the comparison do)")
    parser.add_argument("--aead-sizes", type=int, nargs="+", metavar="BYTES",
                        help="only print the AEAD's CPU per GiB for records of these sizes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aead_sizes:
        aead_record_sizes(args.aead_sizes)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.glibc_defaults:
        keep_large_buffers_in_heap()  # as every overlay-node process does (overlay.runtime.run)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        if args.serve:
            runner.run(serve())
            return 0
        result = runner.run(client(args))
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python={platform.python_version()} loop={type(new_event_loop()).__module__}")
    print("command: OMP_NUM_THREADS=1 python scripts/bench_transport.py " + " ".join(sys.argv[1:]))
    print(f"{'metric':<34}{'ours':>12}{'baseline':>12}{'ratio':>8}")
    rows = [
        ("throughput, 4 MiB messages (MiB/s)", result["encrypted_mib_s"], result["raw_tcp_mib_s"]),
        ("encrypted vs 1-core AEAD (MiB/s)", result["encrypted_mib_s"], result["aead_mib_s"]),
        ("encrypted vs the floor (MiB/s)", result["encrypted_mib_s"], result["floor_mib_s"]),
        ("floor vs 1-core AEAD (MiB/s)", result["floor_mib_s"], result["aead_mib_s"]),
        ("1 KiB RPC p50 vs echo p50 (us)", result["rpc_p50_us"], result["raw_echo_p50_us"]),
        ("1 KiB RPC p99 vs echo p99 (us)", result["rpc_p99_us"], result["raw_echo_p99_us"]),
    ]
    for name, ours, base in rows:
        print(f"{name:<34}{ours:>12.1f}{base:>12.1f}{ours / base:>8.2f}")
    print("CPU per GiB moved (s, least of the rounds; every thread of each process):")
    for name in ("encrypted", "raw_tcp", "floor"):
        print(f"  {name:<10} sender {result[f'{name}_sender_cpu_s_per_gib']:.3f}  "
              f"receiver {result[f'{name}_receiver_cpu_s_per_gib']:.3f}")
    print(f"  AEAD alone, 64 KiB records: {2**10 / result['aead_mib_s']:.3f}")
    ok_tput = result["encrypted_mib_s"] >= 0.5 * result["aead_mib_s"]
    ok_rpc = result["rpc_p50_us"] <= 3 * result["raw_echo_p50_us"]
    print(f"targets: encrypted >= 0.5 x AEAD: {'met' if ok_tput else 'MISSED'}; "
          f"rpc p50 <= 3 x echo p50: {'met' if ok_rpc else 'MISSED'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
