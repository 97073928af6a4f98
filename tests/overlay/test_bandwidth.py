"""The bandwidth test's pure rules (overlay/bandwidth.py): its messages, the node's admission
gate and the tester's sizing. No sockets, no sleeps: time is an argument."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.bandwidth import (
    BAD_REQUEST,
    BUSY,
    DOWNLOAD,
    MAX_TRANSFER_BYTES,
    RATE_LIMITED,
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
    transfer_bps,
)

MiB = 1 << 20


def test_requests_and_answers_round_trip():
    for op in (UPLOAD, DOWNLOAD):
        request = decode_request(encode_request(op, 12345))
        assert (request.op, request.nbytes) == (op, 12345)
    assert decode_request(encode_request(UPLOAD, MAX_TRANSFER_BYTES)).nbytes == MAX_TRANSFER_BYTES
    assert decode_received(encode_received(77)) == 77
    # unknown fields are ignored (forward compatibility)
    extra = msgpack.packb({"v": 1, "op": "download", "bytes": 5, "future": "field"})
    assert decode_request(extra).nbytes == 5


@pytest.mark.parametrize("obj", [
    {"v": 1, "op": "upload", "bytes": MAX_TRANSFER_BYTES + 1},  # oversized
    {"v": 1, "op": "upload", "bytes": 0},
    {"v": 1, "op": "download", "bytes": -5},
    {"v": 1, "op": "download", "bytes": 1.5e6},  # wrong types
    {"v": 1, "op": "download", "bytes": "1000"},
    {"v": 1, "op": "download", "bytes": True},
    {"v": 1, "op": "download", "bytes": (1 << 64) - 1},
    {"v": 1, "op": "delete", "bytes": 10},
    {"v": 1, "op": 3, "bytes": 10},
    {"v": 2, "op": "upload", "bytes": 10},
    {"v": 1.0, "op": "upload", "bytes": 10},  # the version is the integer 1
    {"v": True, "op": "upload", "bytes": 10},
    {"op": "upload", "bytes": 10},
    [1, "upload", 10],
    "upload",
])
def test_bad_requests_are_refused_with_bad_request(obj):
    with pytest.raises(BandwidthTestError) as e:
        decode_request(msgpack.packb(obj))
    assert e.value.code == BAD_REQUEST


def test_a_node_may_set_a_lower_limit_and_empty_streams_are_refused():
    with pytest.raises(BandwidthTestError, match=r"1\.\.1000"):
        decode_request(encode_request(UPLOAD, 1001), max_bytes=1000)
    with pytest.raises(BandwidthTestError, match="ended before"):
        decode_request(None)
    for bad in (None, b"\xc1", msgpack.packb({"received": -1}), msgpack.packb({"n": 3})):
        with pytest.raises(BandwidthTestError):
            decode_received(bad)


@given(st.binary(max_size=200))
def test_garbage_raises_only_the_protocol_error(data):
    try:
        decode_request(data)
    except BandwidthTestError as e:
        assert e.code == BAD_REQUEST


def test_the_gate_admits_one_transfer_at_a_time():
    gate = TransferGate(now=0.0)
    assert gate.admit(MiB, 0.0) is None
    code, message = gate.admit(MiB, 0.1)
    assert code == BUSY and "another bandwidth test" in message
    gate.release()
    assert gate.admit(MiB, 0.2) is None


def test_the_gate_budget_is_a_token_bucket():
    gate = TransferGate(GateConfig(budget_bytes=10 * MiB, budget_period=10.0), now=100.0)
    for i in range(10):
        assert gate.admit(MiB, 100.0 + i * 0.001) is None
        gate.release()
    code, message = gate.admit(MiB, 100.01)
    assert code == RATE_LIMITED and "try again in 1 s" in message
    assert not gate.active  # a refused transfer does not take the slot
    assert gate.admit(MiB, 101.1) is None  # 1 MiB/s refills
    gate.release()
    assert gate.admit(10 * MiB, 1000.0) is None  # never more than the budget in the bucket
    gate.release()
    assert gate.admit(MiB, 1000.0)[0] == RATE_LIMITED


def test_transfer_rate_discounts_one_round_trip_but_never_more_than_half():
    assert transfer_bps(MiB, 1.0, 0.0) == 8 * MiB
    assert transfer_bps(MiB, 1.0, 0.5) == 16 * MiB
    assert transfer_bps(MiB, 1.0, 0.9) == 16 * MiB  # clamped: at most half is round trip
    assert transfer_bps(1, 0.0, 0.0) > 0


def run_sizer(config: SpeedTestConfig, link_bps: float, rtt: float, deadline: float
              ) -> tuple[list[int], TransferSizer]:
    """Drive a sizer against a modelled link: each transfer takes size / rate + rtt."""
    sizer, now, sizes = TransferSizer(config, deadline), 0.0, []
    while (size := sizer.next_size(now)) is not None:
        elapsed = size * 8 / link_bps + rtt
        sizer.record(size, elapsed, rtt)
        sizes.append(size)
        now += elapsed
    return sizes, sizer


def test_the_sizer_grows_until_a_transfer_lasts_long_enough():
    config = SpeedTestConfig()
    sizes, sizer = run_sizer(config, 100e6, 0.01, deadline=0.5)  # 100 Mbit/s, 10 ms
    assert sizes[0] == config.first_bytes and sizes == sorted(sizes)
    assert sizer.last_seconds >= config.min_seconds  # the last transfer is long enough
    assert sizer.bps == pytest.approx(100e6, rel=0.02)
    assert sizer.total_bytes == sum(sizes) and sizer.transfers == len(sizes) <= 4


def test_a_fast_link_stops_at_max_bytes():
    config = SpeedTestConfig(max_bytes=8 * MiB)
    sizes, sizer = run_sizer(config, 10e9, 0.0001, deadline=0.5)
    assert sizes[-1] == 8 * MiB and len(sizes) <= 3
    assert sizer.bps > 5e9


def test_a_slow_link_stops_at_the_deadline_with_what_fits():
    config = SpeedTestConfig()
    sizes, sizer = run_sizer(config, 1e6, 0.05, deadline=0.5)  # 1 Mbit/s: the probe is 0.5 s
    assert sizes == [config.first_bytes]
    assert sizer.bps == pytest.approx(1e6, rel=0.15)
    sizes, _ = run_sizer(config, 4e6, 0.05, deadline=0.5)
    # the second transfer is cut to what fits in the time left, not the 0.2 s wanted
    assert len(sizes) == 2 and sizes[1] * 8 / 4e6 < 0.5 - (sizes[0] * 8 / 4e6 + 0.05)


def test_the_probe_runs_even_after_the_deadline():
    sizer = TransferSizer(SpeedTestConfig(), deadline=1.0)
    assert sizer.next_size(5.0) == SpeedTestConfig().first_bytes
    sizer.record(SpeedTestConfig().first_bytes, 0.01, 0.0)
    assert sizer.next_size(5.0) is None and sizer.next_size(0.0) is None  # done stays done


def test_the_link_figure_is_the_slower_direction():
    measured = LinkMeasurement("peer", upload_bps=50e6, download_bps=200e6, rtt=0.01,
                               total_bytes=MiB, seconds=0.8)
    assert measured.bps == 50e6
