"""`serve`'s link figure (blocks/serve_placement.py `link_bps`): given, skipped, measured
against a real peer on 127.0.0.1, or the default with a warning when nobody answers."""

from __future__ import annotations

import argparse
import logging

import pytest

from blocks.serve_placement import link_bps, positive
from blocks.throughput import DEFAULT_NETWORK_BPS
from overlay.bandwidth_service import BandwidthTestService
from overlay.host import Host
from overlay.identity import Identity
from overlay.multiaddr import Multiaddr


def args(network_mbps=None, throughput="auto") -> argparse.Namespace:
    return argparse.Namespace(network_mbps=network_mbps, throughput=throughput)


async def test_a_given_figure_or_a_fixed_throughput_skips_the_test():
    host = Host()  # not even listening: nothing may be dialled
    try:
        stranger = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}")
        assert await link_bps(args(network_mbps=250.0), host, [stranger]) == (250e6, "given")
        assert await link_bps(args(throughput=12.5), host, [stranger]) == (
            DEFAULT_NETWORK_BPS, "assumed")
        assert host.connected_peers == []
    finally:
        await host.close()


async def test_the_bootstrap_peer_is_measured(caplog):
    node, server = Host(), Host()
    try:
        [addr] = await node.listen("/ip4/127.0.0.1/tcp/0")
        BandwidthTestService().attach(node)
        await server.connect(addr)
        with caplog.at_level(logging.INFO, logger="blocks.serve"):
            bps, source = await link_bps(args(), server, [addr])
        assert source == "measured" and bps > 0 and bps != DEFAULT_NETWORK_BPS
        assert f"network measured against {str(node.peer_id)[-8:]}" in caplog.text
        assert f"{bps / 1e6:.0f} Mbit/s" in caplog.text
    finally:
        await server.close()
        await node.close()


async def test_no_answering_peer_falls_back_to_the_default_with_a_warning(caplog):
    plain, server, lonely = Host(), Host(), Host()  # `plain` does not offer the test
    try:
        [addr] = await plain.listen("/ip4/127.0.0.1/tcp/0")
        await server.connect(addr)
        with caplog.at_level(logging.WARNING, logger="blocks.serve"):
            assert await link_bps(args(), server, [addr]) == (DEFAULT_NETWORK_BPS, "assumed")
            assert await link_bps(args(), lonely, []) == (DEFAULT_NETWORK_BPS, "assumed")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "unknown_method" in warnings[0]
        assert "no peer known" in warnings[1] and "assuming 100 Mbit/s" in warnings[1]
    finally:
        await server.close()
        await plain.close()
        await lonely.close()


@pytest.mark.parametrize("text", ["-5", "nan", "inf", "0"])
def test_a_link_speed_or_period_must_be_above_zero_and_says_so(text):
    """--network-mbps, --announce-period, --balance-period: -5 used to be refused with
    'expected a finite number >= 0', though 0 is refused too."""
    with pytest.raises(argparse.ArgumentTypeError,
                       match=rf"^expected a finite number > 0, got {text}$"):
        positive(text)
