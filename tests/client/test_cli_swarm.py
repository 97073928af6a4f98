"""`overlay-node serve`, `status`, `generate` and `demo` as real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from blocks.throughput import DEFAULT_NETWORK_BPS, network_rps
from client.local_swarm import LocalSwarm
from client.swarm import SwarmClient
from model_parts.files import default_model_id
from tests.model_factory import build_model
from tests.tokenizer_factory import sentencepiece_style

CLI = [sys.executable, "-m", "overlay.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    with LocalSwarm(model_dir, [(0, 2), (2, 4)], extra_serve_args=["--announce-period", "2"],
                    log_dir=tmp_path_factory.mktemp("swarm-logs")) as started:
        yield started


def test_status_shows_servers_and_coverage(swarm, model_dir):
    result = run_cli("status", "--bootstrap", swarm.bootstrap, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout.strip().splitlines()[-1])
    [model] = [m for m in status["models"] if m["model_id"] == default_model_id(model_dir)]
    assert model["num_blocks"] == 4 and model["coverage"] == [1, 1, 1, 1]
    spans = sorted((s["start"], s["end"], s["state"]) for s in model["servers"])
    assert spans == [(0, 2, "online"), (2, 4, "online")]
    text = run_cli("status", "--bootstrap", swarm.bootstrap)
    assert "4/4 covered" in text.stdout
    named = run_cli("status", "--bootstrap", swarm.bootstrap, "--model",
                    default_model_id(model_dir))
    assert named.returncode == 0 and "4/4 covered" in named.stdout, named.stderr


def test_status_of_a_model_not_in_the_swarm_exits_1(swarm):
    """As `dht get` of a missing key: a script asking for one model learns it is not there."""
    text = run_cli("status", "--bootstrap", swarm.bootstrap, "--model", "no-such-model")
    assert text.returncode == 1
    assert text.stderr.strip().splitlines()[-1] == (
        "overlay-node status: model 'no-such-model' is not registered in this swarm")
    as_json = run_cli("status", "--bootstrap", swarm.bootstrap, "--model", "no-such-model",
                      "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout.strip().splitlines()[-1])["models"] == []


MEASURED = re.compile(r"network measured against \S+: .* \(([\d.]+) MiB in ([\d.]+) s.*\): "
                      r"(\d+) Mbit/s")


async def test_servers_announce_the_network_rate_they_measured(swarm, model_dir):
    """Started without --network-mbps, each server measured its link against the bootstrap
    node (the log says so) and announces the tokens/s that figure carries, not the default."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    client = await SwarmClient.connect([swarm.bootstrap])
    try:
        view = await client.view(default_model_id(model_dir), 4)
    finally:
        await client.close()
    servers = [p for p in swarm.processes if p.name.startswith("server")]
    assert len(servers) == 2
    for entry in servers:
        match = MEASURED.search(entry.log_path.read_text())
        assert match, entry.log_path.read_text()[-2000:]
        mib, seconds, mbps = float(match[1]), float(match[2]), int(match[3])
        assert 0 < mib <= 32 and seconds < 2.5  # bounded: a few MiB, about a second
        info = view.servers[entry.addr.rsplit("/p2p/", 1)[1]]
        assert info.network_rps == pytest.approx(network_rps(hidden, mbps * 1e6), abs=
                                                 network_rps(hidden, 0.5e6))
        assert info.network_rps != network_rps(hidden, DEFAULT_NETWORK_BPS)


def test_generate_matches_local_greedy(swarm, model_dir):
    ids = [5, 17, 99, 3, 42]
    result = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                     "--input-ids", ",".join(map(str, ids)), "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    new_tokens = json.loads(result.stdout.strip().splitlines()[-1])["new_tokens"]
    with torch.no_grad():
        expected = build_model("llama").generate(torch.tensor([ids]), max_new_tokens=12,
                                                 do_sample=False)[0, len(ids):].tolist()
    assert new_tokens == expected
    # Streamed without --json: the ids as --input-ids takes them, on one line.
    plain = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                    "--input-ids", ",".join(map(str, ids)), "--max-new-tokens", "12")
    assert plain.returncode == 0 and plain.stdout == ",".join(map(str, expected)) + "\n"
    huge = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                   "--input-ids", "99999999999999999999", "--max-new-tokens", "1")
    assert huge.returncode != 0 and "Traceback" not in huge.stderr
    assert "--input-ids must be integers" in huge.stderr
    none = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                   "--input-ids", "5,6", "--max-new-tokens", "0", "--json")
    assert none.returncode == 0, none.stderr
    assert json.loads(none.stdout.strip().splitlines()[-1]) == {
        "new_tokens": [], "route": [], "ms_per_token": None}  # no step: no time per token


def test_generate_streams_the_prompts_continuation_as_text(swarm, model_dir):
    """--prompt with the directory's tokenizer (SentencePiece-style here, as Llama's): the text
    printed token by token is the finished generation's text, spaces included."""
    tokenizer = sentencepiece_style()
    tokenizer.save_pretrained(model_dir)  # tokenizer files beside the model's: as on the Hub
    prompt = "hello world, the quick"
    result = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                     "--prompt", prompt, "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        full = build_model("llama").generate(torch.tensor([ids]), max_new_tokens=16,
                                             do_sample=False)[0].tolist()
    text = tokenizer.decode(full, skip_special_tokens=True)
    shown = tokenizer.decode(ids, skip_special_tokens=True)
    assert result.stdout == text[len(shown):] + "\n"
    # The tokens decoded one by one would have lost the spaces (this model's tokens have some).
    one_by_one = "".join(tokenizer.decode([t], skip_special_tokens=True) for t in full[len(ids):])
    assert " " in result.stdout and one_by_one != result.stdout.rstrip("\n")
    as_json = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                      "--prompt", prompt, "--max-new-tokens", "16", "--json")
    assert json.loads(as_json.stdout.strip().splitlines()[-1])["new_tokens"] == full[len(ids):]
    # Several prompts: one row of text per prompt, each its new tokens' text.
    two = ["--prompt", prompt, "--prompt", "the lazy dog"]
    rows = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap, *two,
                   "--max-new-tokens", "6")
    rows_json = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap, *two,
                        "--max-new-tokens", "6", "--json")
    assert rows.returncode == 0 and rows_json.returncode == 0, rows.stderr + rows_json.stderr
    tokens = json.loads(rows_json.stdout.strip().splitlines()[-1])["new_tokens"]
    assert rows.stdout.splitlines() == [
        f"[{i}] {tokenizer.decode(t, skip_special_tokens=True)}" for i, t in enumerate(tokens)]


def test_generate_a_batch_of_prompts_of_different_lengths(swarm, model_dir):
    """Several --input-ids: left-padded into one batch, each row as transformers generates it
    given the padding mask; one list of new tokens per prompt, ending at its end token (2):
    the padding after it while the other rows go on used to be listed too."""
    rows = [[5, 17, 99, 3, 42], [8, 9], [30, 31, 32]]
    args = [arg for row in rows for arg in ("--input-ids", ",".join(map(str, row)))]
    result = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap, *args,
                     "--max-new-tokens", "10", "--json")
    assert result.returncode == 0, result.stderr
    new_tokens = json.loads(result.stdout.strip().splitlines()[-1])["new_tokens"]
    ids = torch.tensor([[0] * (5 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (5 - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        full = build_model("llama").generate(ids, attention_mask=mask, max_new_tokens=10,
                                             do_sample=False, pad_token_id=0)[:, 5:].tolist()
    expected = [row[:row.index(2) + 1] if 2 in row else row for row in full]
    assert [len(row) for row in expected] == [10, 10, 6]  # the last row ends early
    assert new_tokens == expected
    text = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap, *args,
                   "--max-new-tokens", "10")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [f"[{i}] " + ",".join(map(str, row))
                                        for i, row in enumerate(expected)]


def test_serve_refuses_bad_arguments(model_dir, swarm):
    bad = run_cli("serve", str(model_dir), "--blocks", "3:9", "--bootstrap", swarm.bootstrap)
    assert bad.returncode != 0 and "not a non-empty range" in bad.stderr
    bad = run_cli("serve", str(model_dir) + "-missing", "--bootstrap", swarm.bootstrap)
    assert bad.returncode != 0 and "overlay-node serve:" in bad.stderr
    for option, value in (("--cache-tokens", "-5"), ("--cache-tokens", "0"),
                          ("--max-length", "0"), ("--max-request-tokens", "0"),
                          ("--max-backward-tokens", "0"),
                          ("--announce-period", "0")):
        bad = run_cli("serve", str(model_dir), "--blocks", "0:2", option, value,
                      "--bootstrap", swarm.bootstrap)  # refused before anything is loaded
        assert bad.returncode == 2 and option in bad.stderr and "Traceback" not in bad.stderr
    taken = swarm.bootstrap.rsplit("/p2p/", 1)[0]  # the bootstrap node listens there
    bad = run_cli("serve", str(model_dir), "--blocks", "0:2", "--listen", taken,
                  "--bootstrap", swarm.bootstrap)
    assert bad.returncode != 0 and "cannot listen on" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                  "--input-ids", "1,x")
    assert bad.returncode != 0 and "--input-ids" in bad.stderr
    for command in (["status"], ["generate", str(model_dir), "--input-ids", "1"]):
        bad = run_cli(*command, "--bootstrap", "garbage")
        assert bad.returncode == 2 and "--bootstrap: multiaddr must start with '/'" in bad.stderr


@pytest.mark.parametrize(("spec", "reason"), [
    ("foo", "--adapter must look like NAME=DIR, got 'foo'"),
    ("foo=/nonexistent", "adapter 'foo': cannot read /nonexistent/adapter_config.json"),
])
def test_serve_refuses_a_bad_adapter_before_anything_else(model_dir, spec, reason):
    """It used to join the DHT, measure the link and load every block first (minutes for a
    large model), and only then read --adapter: here the unreachable bootstrap would have
    been the error, after a wait."""
    bad = run_cli("serve", str(model_dir), "--blocks", "0:2", "--adapter", spec,
                  "--bootstrap", "/ip4/127.0.0.1/tcp/1", "--listen", "/ip4/127.0.0.1/tcp/0")
    assert bad.returncode == 1
    [line] = bad.stderr.splitlines()
    assert line.startswith(f"overlay-node serve: {reason}")


def test_generate_prompt_without_a_tokenizer_is_one_line(model_dir, tmp_path):
    """Refused before dialing (the address is never dialed); transformers' reason used to
    spread over five lines. Its own directory: another test saves a tokenizer in model_dir."""
    import shutil

    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    bad = run_cli("generate", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/1",
                  "--prompt", "hi")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    [line] = bad.stderr.splitlines()
    assert line.startswith("overlay-node generate: ") and "has no tokenizer" in line
    assert line.endswith("use --input-ids instead")


def test_generate_without_servers_says_why(model_dir, swarm):
    """Blocks nobody serves: the reason on standard error and exit 1, not a traceback."""
    result = run_cli("generate", str(model_dir), "--bootstrap", swarm.bootstrap,
                     "--model-id", "nobody-serves-this", "--input-ids", "1,2",
                     "--max-new-tokens", "2")
    assert result.returncode == 1, result.stderr
    assert "overlay-node generate:" in result.stderr and "blocks 0-3" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_and_generate_give_up_on_a_silent_bootstrap_peer_in_time(model_dir):
    """A bootstrap peer that accepts TCP and never speaks: `status` had no --timeout and each
    command waited for the 10 s dial; now --timeout / --connect-timeout bound the join and
    one line says so."""
    import socket

    from overlay.identity import Identity

    with socket.socket() as silent:  # the kernel accepts; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        addr = (f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/"
                f"{Identity.generate().peer_id}")
        for command in (["status", "--bootstrap", addr, "--timeout", "1"],
                        ["generate", str(model_dir), "--bootstrap", addr, "--input-ids", "5,6",
                         "--connect-timeout", "1"]):
            began = time.monotonic()
            result = run_cli(*command, timeout=60)
            joined = time.monotonic() - began
            assert result.returncode == 1, result.stderr
            line = result.stderr.strip().splitlines()[-1]
            assert line.startswith(f"overlay-node {command[0]}: could not join the swarm "
                                   f"through ['{addr}'] within 1 s"), result.stderr
            assert "Traceback" not in result.stderr
            if command[0] == "status":  # generate's start (torch, the head) varies more
                assert joined < 9.0, joined  # the dial alone took 10 s


async def test_clean_exit_announces_offline(model_dir, swarm):
    """Also: a server announces the addresses named by --announce-addr (a public address
    behind NAT) instead of its listen address."""
    extra = LocalSwarm(model_dir, [(0, 4)], extra_serve_args=["--announce-period", "2"])
    # reuse the running swarm's bootstrap node: start one more server by hand
    proc = subprocess.Popen(
        [*CLI, "serve", str(model_dir), "--blocks", "0:4", "--listen", "/ip4/127.0.0.1/tcp/0",
         "--announce-addr", "/ip4/203.0.113.7/tcp/4242", "--bootstrap", swarm.bootstrap,
         "--announce-period", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, text=True)
    try:
        printed = proc.stdout.readline().strip()
        assert printed.startswith("/ip4/127.0.0.1/")
        coverage = _coverage(swarm, model_dir)
        assert coverage == [2, 2, 2, 2]
        client = await SwarmClient.connect([swarm.bootstrap])
        try:
            view = await client.view(default_model_id(model_dir), 4)
        finally:
            await client.close()
        extra_peer = printed.rsplit("/p2p/", 1)[1]
        assert view.servers[extra_peer].addrs == (f"/ip4/203.0.113.7/tcp/4242/p2p/{extra_peer}",)
        for entry in swarm.processes:
            if entry.name.startswith("server"):
                assert view.servers[entry.addr.rsplit("/p2p/", 1)[1]].addrs == (entry.addr,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert _coverage(swarm, model_dir) == [1, 1, 1, 1]  # offline at once, not after expiry
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        extra.stop()


def _coverage(swarm, model_dir) -> list[int]:
    result = run_cli("status", "--bootstrap", swarm.bootstrap, "--json")
    status = json.loads(result.stdout.strip().splitlines()[-1])
    [model] = [m for m in status["models"] if m["model_id"] == default_model_id(model_dir)]
    return model["coverage"]


def test_demo_runs_and_checks_itself(tmp_path):
    began = time.monotonic()
    result = run_cli("demo", "--max-new-tokens", "8", "--cache-dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: identical to the same model run locally" in result.stdout
    assert "stopped every process" in result.stdout
    assert time.monotonic() - began < 300


def test_demo_models_written_together_are_both_usable(tmp_path):
    """Two demos started together both wrote `<cache>/demo-llama-6x64.tmp`, and the second
    rename failed with OSError; each now writes its own temporary directory."""
    import concurrent.futures
    import threading

    from client.demo import write_demo_model

    target = tmp_path / "demo-llama-6x64"
    together = threading.Barrier(3)

    def write() -> object:
        together.wait(timeout=30)
        return write_demo_model(target)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(write) for _ in range(3)]]
    assert results == [target] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left
    assert (target / "model.safetensors").exists()
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    (tmp_path / "partial" / "notes.txt").write_text("not the demo's")
    with pytest.raises(OSError, match="holds no complete model"):
        write_demo_model(tmp_path / "partial")


def test_a_damaged_cached_demo_model_is_written_again(tmp_path, capsys):
    """A truncated model.safetensors (a full disk, a killed write) or a broken config.json made
    every later demo fail with "server-0-2 exited; its log ends with: (no log kept)"."""
    from client.demo import write_demo_model

    target = write_demo_model(tmp_path / "demo-llama-6x64")
    weights = target / "model.safetensors"
    whole = weights.read_bytes()
    for damage in (lambda: weights.write_bytes(whole[:-100]),
                   lambda: (target / "config.json").write_text("{broken")):
        damage()
        assert write_demo_model(target) == target
        assert "is damaged" in capsys.readouterr().err
        assert weights.read_bytes() == whole  # the same seeded model again
        assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_server_that_fails_to_start_shows_the_end_of_its_log(tmp_path):
    """Without log_dir, the servers' standard error went to /dev/null: the failure said only
    "(no log kept)"."""
    from client.local_swarm import LocalSwarm, SwarmStartError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{broken")
    with pytest.raises(SwarmStartError) as failed:
        LocalSwarm(broken, [(0, 1)], start_timeout=120).start()
    assert "server-0-1 exited" in str(failed.value)
    assert "config.json" in str(failed.value) and "no log kept" not in str(failed.value)


def test_demo_says_in_one_line_that_it_cannot_write_its_model(tmp_path):
    """A --cache-dir or --keep-logs that is a file (or not writable) ended in a
    FileExistsError traceback."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = run_cli("demo", "--max-new-tokens", "2", "--cache-dir", str(not_a_dir), timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "overlay-node demo: cannot write the demo model: ")
    assert "started a bootstrap node" not in result.stdout  # nothing was started
    logs_in_a_file = run_cli("demo", "--max-new-tokens", "2", "--cache-dir", str(tmp_path),
                             "--keep-logs", str(not_a_dir), timeout=120)
    assert logs_in_a_file.returncode == 1, logs_in_a_file.stderr
    assert "Traceback" not in logs_in_a_file.stderr
    assert logs_in_a_file.stderr.strip().splitlines()[-1].startswith(
        "overlay-node demo: the local swarm did not start: ")


@pytest.mark.parametrize(("option", "value"), [
    ("--max-new-tokens", "-1"), ("--max-new-tokens", "x"), ("--temperature", "0"),
    ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-3"),
    ("--seed", str(1 << 64)), ("--seed", "x"),
])
def test_generate_refuses_bad_numbers_while_parsing(model_dir, option, value):
    """Exit 2 with argparse's line, before dialing (the address is never dialed): they used to
    be refused with exit 1 after joining the swarm, and a seed past 2**64 with a traceback."""
    bad = run_cli("generate", str(model_dir), "--bootstrap", "/ip4/127.0.0.1/tcp/1",
                  "--input-ids", "5,6", "--sample", option, value, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert f"argument {option}" in bad.stderr.splitlines()[-1]


@pytest.mark.parametrize("count", ["0", "-1", "x"])
def test_demo_refuses_a_bad_token_count_before_starting(tmp_path, count):
    """Refused while parsing: -1 used to start the whole swarm, then end in a traceback."""
    result = run_cli("demo", "--max-new-tokens", count, "--cache-dir", str(tmp_path),
                     timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --max-new-tokens" in result.stderr.splitlines()[-1]
    assert not any(tmp_path.iterdir())  # no model written, no process started
