"""A swarm on this machine: one `overlay-node join` bootstrap node and `overlay-node serve`
processes on 127.0.0.1, for the demo, the tests and the benchmarks.

Every process it starts is remembered by pid and stopped in `stop()` (SIGTERM, then SIGKILL
after a grace period), which also runs on exceptions and Ctrl-C when used as a context manager.
Should the owner die without stopping them (SIGKILL, a crash), they stop by themselves: on
POSIX each gets the read end of a pipe whose write end only the owner holds (`--lifeline-fd`,
overlay/cli/lifeline.py), and the kernel closes it with the owner, whichever thread started
them.
"""

from __future__ import annotations

import contextlib
import io
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class SwarmStartError(RuntimeError):
    """A process of the local swarm failed to start; the message carries its log."""


@dataclass
class _Process:
    name: str
    proc: subprocess.Popen
    addr: str = ""
    log_path: Path | None = None
    log_file: IO[bytes] | None = None  # without a log_dir: an unnamed file, for the tail

    def log_tail(self, size: int = 3000) -> str:
        """The end of its standard error, for the reason a start failed."""
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace")[-size:]
        if self.log_file is None or self.log_file.closed:
            return "(no log kept)"
        self.log_file.seek(max(0, self.log_file.seek(0, io.SEEK_END) - size))
        return self.log_file.read().decode(errors="replace") or "(nothing)"


@dataclass
class LocalSwarm:
    model_dir: str | Path
    spans: Sequence[tuple[int, int]]
    extra_serve_args: Sequence[str] = ()
    start_timeout: float = 120.0
    log_dir: str | Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    processes: list[_Process] = field(default_factory=list, init=False)
    bootstrap: str = field(default="", init=False)
    _aborted: bool = field(default=False, init=False)
    _lifeline: tuple[int, int] | None = field(default=None, init=False)  # (read, write) fds

    def abort(self) -> None:
        """Make a `start()` running in another thread give up at its next check (Ctrl-C)."""
        self._aborted = True

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "overlay.cli.main", *args]

    def _lifeline_args(self) -> tuple[list[str], tuple[int, ...]]:
        """The children's `--lifeline-fd` and the fd to pass them; none where pass_fds is
        not supported (Windows): there the owner's `stop()` alone stops them."""
        if os.name != "posix":
            return [], ()
        if self._lifeline is None:
            self._lifeline = os.pipe()  # not inheritable: only the read end is passed on
        read_end = self._lifeline[0]
        return ["--lifeline-fd", str(read_end)], (read_end,)

    def _spawn(self, name: str, args: list[str]) -> _Process:
        if self._aborted:
            raise SwarmStartError("start-up was interrupted")
        lifeline_args, pass_fds = self._lifeline_args()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.env}
        log_path = log_file = None
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            log_path = Path(self.log_dir) / f"{name}.log"
            stderr = open(log_path, "wb")  # noqa: SIM115 - closed once the child has it
        else:  # kept (unnamed) so that a failed start can say why
            stderr = log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(self._command(*args, *lifeline_args), stdout=subprocess.PIPE,
                                stderr=stderr, env=env, text=True, start_new_session=True,
                                pass_fds=pass_fds)
        if log_file is None:
            stderr.close()
        entry = _Process(name, proc, log_path=log_path, log_file=log_file)
        self.processes.append(entry)
        return entry

    def _first_line(self, entry: _Process, deadline: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(entry.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if self._aborted:
                    raise SwarmStartError("start-up was interrupted")
                if sel.select(timeout=0.2):
                    line = entry.proc.stdout.readline().strip()
                    if line:
                        return line
                if entry.proc.poll() is not None:
                    break
        finally:
            sel.close()
        state = "exited" if entry.proc.poll() is not None else "did not answer in time"
        raise SwarmStartError(f"{entry.name} {state}; its log ends with:\n{entry.log_tail()}")

    def start(self) -> LocalSwarm:
        deadline = time.monotonic() + self.start_timeout
        try:
            boot = self._spawn("bootstrap", ["join", "--listen", "/ip4/127.0.0.1/tcp/0"])
            self.bootstrap = boot.addr = self._first_line(boot, deadline)
            servers = [self._spawn_server(start, end) for start, end in self.spans]
            for entry in servers:  # they load in parallel; each prints once announced
                entry.addr = self._first_line(entry, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_server(self, start: int, end: int, *args: str) -> _Process:
        name = f"server-{start}-{end}"
        if any(p.name == name for p in self.processes):  # one log file each
            name += f"-{sum(p.name.startswith('server') for p in self.processes)}"
        return self._spawn(name, [
            "serve", str(self.model_dir), "--blocks", f"{start}:{end}",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", self.bootstrap,
            *self.extra_serve_args, *args,
        ])

    def start_server(self, start: int, end: int, *args: str) -> int:
        """Start one more server for blocks [start, end) once the swarm runs, with `args`
        after `extra_serve_args` (a later option wins); returns its index (for
        `kill_server`) when it has announced itself."""
        entry = self._spawn_server(start, end, *args)
        entry.addr = self._first_line(entry, time.monotonic() + self.start_timeout)
        return [p for p in self.processes if p.name.startswith("server")].index(entry)

    @property
    def server_addrs(self) -> list[str]:
        return [p.addr for p in self.processes if p.name.startswith("server")]

    def kill_server(self, index: int, sig: int = signal.SIGKILL) -> None:
        servers = [p for p in self.processes if p.name.startswith("server")]
        os.kill(servers[index].proc.pid, sig)
        servers[index].proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        for entry in self.processes:
            if entry.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for entry in self.processes:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                entry.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.proc.pid, signal.SIGKILL)
                entry.proc.wait(timeout=10)
            if entry.proc.stdout is not None:
                entry.proc.stdout.close()
            if entry.log_file is not None:
                entry.log_file.close()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
