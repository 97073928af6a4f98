"""The TEST-ONLY link delay (overlay/link_delay.py): off unless asked for; when on, every
write of a host reaches the peer later, in order, and closing still delivers it."""

from __future__ import annotations

import pytest

from overlay import link_delay
from overlay.connection import Connection
from overlay.host import Host


async def echo(ctx, payload: bytes) -> bytes:
    return payload


def test_off_unless_set(monkeypatch):
    monkeypatch.delenv(link_delay.ENV_VAR, raising=False)
    assert link_delay.delay_from_env() == 0.0 and Connection.link_delay == 0.0
    monkeypatch.setenv(link_delay.ENV_VAR, "20")
    assert link_delay.delay_from_env() == 0.02
    for bad in ("fast", "-1", "1e9"):
        monkeypatch.setenv(link_delay.ENV_VAR, bad)
        with pytest.raises(ValueError, match=link_delay.ENV_VAR):
            link_delay.delay_from_env()


async def test_a_delayed_host_adds_its_delay_to_each_direction(monkeypatch):
    monkeypatch.setenv(link_delay.ENV_VAR, "30")
    slow = Host()  # read once, here
    monkeypatch.delenv(link_delay.ENV_VAR)
    fast = Host()
    try:
        [addr] = await fast.listen("/ip4/127.0.0.1/tcp/0")
        fast.add_handler("echo", echo)
        answers = [await slow.call(addr, "echo", bytes([i]) * 1000) for i in range(5)]
        assert answers == [bytes([i]) * 1000 for i in range(5)]
        conn = slow.connection_to(fast.peer_id)
        assert isinstance(conn._transport, link_delay.DelayedTransport)
        other = fast.connection_to(slow.peer_id)
        assert not isinstance(other._transport, link_delay.DelayedTransport)
        rtt = await conn.ping()
        assert rtt >= 0.03  # only the slow side's writes wait: 30 ms once per round trip
    finally:
        await slow.close()
        await fast.close()
