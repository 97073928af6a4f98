"""The `overlay-node` command line, run as real subprocesses on 127.0.0.1.

Includes the interoperability check of the wire protocol: an initiator built from the
independent `noiseprotocol` package completes the handshake against `overlay-node join` over a
real socket, and is disconnected when its identity signature is wrong.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from overlay.identity import Identity
from overlay.multiaddr import Multiaddr

noise_connection = pytest.importorskip("noise.connection")

CLI = [sys.executable, "-m", "overlay.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Node:
    """`overlay-node join` in a subprocess; always killed by pid when the test ends."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [*CLI, "join", "--listen", "/ip4/127.0.0.1/tcp/0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True,
        )
        self.addr = Multiaddr.parse(self._first_line(timeout=30))

    def _first_line(self, timeout: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            raise AssertionError("overlay-node join printed no address in time")
        line = self.proc.stdout.readline().strip()
        assert line, self.proc.stderr.read()
        return line

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=10)
        finally:
            self.kill()
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def node():
    started = Node()
    yield started
    started.kill()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_id_creates_a_private_identity_file_and_is_stable(tmp_path):
    path = tmp_path / "key"
    first = run_cli("id", "--identity", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().startswith("12D3KooW")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert run_cli("id", "--identity", str(path)).stdout == first.stdout
    path.chmod(0o644)
    refused = run_cli("id", "--identity", str(path))
    assert refused.returncode != 0 and "chmod 600" in refused.stderr


def test_join_prints_its_address_first_and_answers_ping(tmp_path):
    key = tmp_path / "node.key"
    Identity.generate().save(key)
    expected = Identity.load(key).peer_id
    node = Node("--identity", str(key))
    try:
        assert node.addr.peer_id == expected and node.addr.host == "127.0.0.1"
        ping = run_cli("ping", str(node.addr), "--count", "2", "--interval", "0.05")
        assert ping.returncode == 0, ping.stderr
        assert f"connected to {expected}" in ping.stdout
        assert ping.stdout.count("time=") == 2
        # a joined node offers the bandwidth test (overlay/bandwidth.py)
        measured = run_cli("ping", str(node.addr), "--count", "1", "--bandwidth")
        assert measured.returncode == 0, measured.stdout + measured.stderr
        line = measured.stdout.strip().splitlines()[-1]
        up, down = (float(w) for w in re.findall(r"([\d.]+) Mbit/s", line))
        assert line.startswith("bandwidth: ") and up > 0 and down > 0
        wrong = node.addr.with_peer(Identity.generate().peer_id)
        refused = run_cli("ping", str(wrong), "--count", "1")
        assert refused.returncode == 1 and "expected peer" in refused.stderr
        # it did speak the overlay: the reason is the identity, not bytes it sent
        assert "did not complete" not in refused.stderr, refused.stderr
        code, log = node.stop(signal.SIGINT)
        assert code == 0 and "shutting down" in log
    finally:
        node.kill()


def test_a_wildcard_listen_address_is_printed_as_one_other_machines_can_dial():
    """`join` listens on 0.0.0.0 by default: its first line is the machine's address on its
    default route (what `serve` announces), not loopback, which no other machine can use as
    `--bootstrap`; loopback only where there is no default route."""
    from overlay.cli.node import dialable

    peer = Identity.generate().peer_id
    wildcard = Multiaddr.parse(f"/ip4/0.0.0.0/tcp/4001/p2p/{peer}")
    routes = {"ip4": "192.168.7.9", "ip6": None}
    assert str(dialable(wildcard, routes.get)) == f"/ip4/192.168.7.9/tcp/4001/p2p/{peer}"
    ip6 = Multiaddr.parse(f"/ip6/::/tcp/4001/p2p/{peer}")
    assert str(dialable(ip6, routes.get)) == f"/ip6/::1/tcp/4001/p2p/{peer}"
    exact = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
    assert dialable(exact, routes.get) == exact  # tests and the demo listen there


def test_bad_arguments_are_clear_errors():
    bad = run_cli("ping", "/ip4/300.1.1.1/tcp/1")
    assert bad.returncode != 0 and "invalid IPv4 address" in bad.stderr
    bad = run_cli("join", "--listen", "/ip4/127.0.0.1/udp/1")
    assert bad.returncode != 0 and "only /tcp" in bad.stderr


def test_ping_to_a_silent_port_is_one_error_line():
    """A port that accepts TCP and never answers the handshake: the dial's timeout is the one
    line on stderr (no log line of the aborted connection before it)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes TCP connections; nobody answers them
        port = silent.getsockname()[1]
        for target in (f"/ip4/127.0.0.1/tcp/{port}",
                       f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"):
            done = run_cli("ping", target, "--timeout", "0.5", timeout=30)
            assert done.returncode == 1 and done.stdout == ""
            assert done.stderr.splitlines() == [
                f"overlay-node ping: dial {target}: timed out after 0.5 s: the peer did not "
                "complete the overlay's handshake (it sent nothing)"], done.stderr


def test_join_refuses_a_listen_address_naming_another_peer(tmp_path):
    """A --listen with the /p2p/ of another identity (an address copied from elsewhere) was
    dropped unsaid: the node ran under a peer id other than the one its operator wrote."""
    key = tmp_path / "node.key"
    Identity.generate().save(key)
    own, other = Identity.load(key).peer_id, Identity.generate().peer_id
    refused = run_cli("join", "--listen", f"/ip4/127.0.0.1/tcp/0/p2p/{other}", "--identity",
                      str(key), timeout=30)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"overlay-node: --listen names peer {other}, but this node is {own} (its identity: "
        f"--identity PATH)"]
    node = Node("--listen", f"/ip4/127.0.0.1/tcp/0/p2p/{own}", "--identity", str(key))
    try:  # (the last --listen counts) its own peer id is fine
        assert node.addr.peer_id == own
    finally:
        node.kill()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_ping_count_must_be_at_least_one(count):
    bad = run_cli("ping", "/ip4/127.0.0.1/tcp/1", "--count", count, timeout=30)
    assert bad.returncode == 2 and "--count/-c: must be at least 1" in bad.stderr


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--timeout", "nan", "> 0, got nan"), ("--timeout", "0", "> 0, got 0"),
    ("--timeout", "-1", "> 0, got -1"), ("--timeout", "inf", "> 0, got inf"),
    ("--interval", "nan", ">= 0, got nan"), ("--interval", "-0.5", ">= 0, got -0.5"),
])
def test_ping_times_must_be_finite_seconds(option, value, message):
    """Refused while parsing: nan used to end in a traceback, a timeout <= 0 in a dial that
    'timed out after 0 s'."""
    bad = run_cli("ping", "/ip4/127.0.0.1/tcp/1", option, value, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1].endswith(f"argument {option}: must be a finite number "
                                                f"of seconds {message}")


# Ctrl-C raised where the import of this module starts, as the signal would raise it there.
INTERRUPT_AT_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["overlay-node", *{argv!r}]
from overlay.cli.main import main  # as the console script does
sys.exit(main())
"""


@pytest.mark.parametrize(("module", "argv"), [
    ("overlay.cli.node", ["join"]),  # while the entry point itself is imported
    ("torch", ["serve", "model-dir", "--blocks", "0:1"]),  # while serve's package is imported
])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(module, argv):
    """It used to print the whole import stack (dozens of lines through torch)."""
    code = INTERRUPT_AT_IMPORT.format(module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert (done.returncode, done.stderr) == (130, "overlay-node: interrupted\n")


# A slow import of this module (as torch's takes seconds), announced on stderr.
SLOW_IMPORT = """
import sys, time
class Slow:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            print("importing", name, file=sys.stderr, flush=True)
            time.sleep(20)
sys.meta_path.insert(0, Slow())
sys.argv = ["overlay-node", *{argv!r}]
from overlay.cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize(("module", "argv"), [
    ("blocks.span", ["serve", "model-dir", "--blocks", "0:1"]),
    ("client.model", ["generate", "model-dir", "--bootstrap", "/ip4/127.0.0.1/tcp/1",
                      "--input-ids", "1"]),
])
def test_a_real_ctrl_c_during_the_heavy_imports_stops_at_once_with_130(module, argv):
    """The imports of torch and the model code ran inside the event loop, whose SIGINT handler
    waits for the running code: Ctrl-C took effect only once they ended (seconds), and `serve`
    then exited 0 as after a load."""
    code = SLOW_IMPORT.format(module=module, argv=argv)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(f"importing {module}"):
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130  # not after the 20 s import
        assert proc.stderr.read().strip().splitlines()[-1] == "overlay-node: interrupted"
    finally:
        proc.kill()


@pytest.mark.parametrize("command", [["id"], ["join", "--listen", "/ip4/127.0.0.1/tcp/0"]])
def test_unwritable_identity_path_is_one_clear_line(tmp_path, command):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    unwritable = {in_the_way / "x.key": f"{in_the_way} is not a directory",
                  in_the_way / "sub" / "x.key": "Not a directory"}
    if os.path.isdir("/proc/self"):
        unwritable["/proc/x.key"] = "No such file or directory"  # procfs: no new files
    for path, reason in unwritable.items():
        bad = run_cli(*command, "--identity", str(path), timeout=30)
        assert bad.returncode == 1, bad.stderr
        assert bad.stderr.startswith(f"overlay-node: cannot write identity file {path}: {reason}")
        assert bad.stderr.count("\n") == 1, bad.stderr  # one line, no traceback


def _frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + bytes(message)


def _read_frame(sock: socket.socket) -> bytes:
    header = _recv_exactly(sock, 2)
    return _recv_exactly(sock, int.from_bytes(header, "big"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _noiseprotocol_handshake(addr: Multiaddr, sign_correctly: bool):
    """Dial with the `noiseprotocol` package and our payload format built by hand."""
    conn = noise_connection.NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    conn.set_prologue(b"overlay-node/1")
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, os.urandom(32))
    conn.set_as_initiator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.start_handshake()
    sock = socket.create_connection((addr.host, addr.port), timeout=10)
    sock.sendall(_frame(conn.write_message(b"")))
    payload = msgpack.unpackb(bytes(conn.read_message(_read_frame(sock))))
    assert payload["v"] == 1 and addr.peer_id.public_key == payload["key"]
    assert addr.peer_id.verify(
        payload["sig"],
        b"noise-libp2p-static-key:" + conn.noise_protocol.handshake_state.rs.public_bytes,
    )
    key = Ed25519PrivateKey.generate()
    static = conn.noise_protocol.keypairs["s"].public_bytes
    signed = b"noise-libp2p-static-key:" + (static if sign_correctly else bytes(32))
    sock.sendall(_frame(conn.write_message(msgpack.packb({
        "v": 1,
        "key": key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        "sig": key.sign(signed),
    }))))
    assert conn.handshake_finished
    return sock, conn


def test_independent_noise_implementation_talks_to_join(node):
    sock, conn = _noiseprotocol_handshake(node.addr, sign_correctly=True)
    # A multiplexer PING frame (overlay/PROTOCOL.md): type 2, flags 0, stream 0, opaque 7.
    ping = bytes([2, 0]) + (0).to_bytes(4, "big") + (7).to_bytes(4, "big")
    sock.sendall(_frame(conn.encrypt(ping)))
    answer = bytes(conn.decrypt(_read_frame(sock)))
    assert answer == bytes([2, 8]) + (0).to_bytes(4, "big") + (7).to_bytes(4, "big")  # PING ACK
    sock.close()


def test_bad_signature_from_independent_implementation_is_disconnected(node):
    sock, _ = _noiseprotocol_handshake(node.addr, sign_correctly=False)
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline:
        try:
            if sock.recv(100) == b"":
                closed = True
                break
        except ConnectionResetError:
            closed = True
            break
    sock.close()
    assert closed
    # ... and the node still serves others.
    sock, _ = _noiseprotocol_handshake(node.addr, sign_correctly=True)
    sock.close()
