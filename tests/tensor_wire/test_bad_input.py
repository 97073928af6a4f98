"""Bad input from the network: every malformed encoding raises WireError, nothing else."""

from __future__ import annotations

import struct

import lz4.block
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensor_wire as tw
from tensor_wire.layout import MESSAGE_HEAD, RECORD_HEAD
from tests.tensor_wire.helpers import COMPRESSION_NAMES, DTYPE_NAMES, make_tensor, shapes

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record(dtype=1, codec=0, shape=(2,), payload=b"\0" * 8, version=1, flags=0, magic=b"TW",
           length=None):
    """A record head written by hand, so that every field can be wrong on purpose."""
    size = len(payload) if length is None else length
    head = RECORD_HEAD.pack(magic, version, dtype, codec, len(shape), flags, size)
    return head + b"".join(struct.pack("<Q", dim) for dim in shape) + payload


def message(body=b"", count=0, meta=b"\x80", total=None, version=1, flags=0, reserved=0):
    data = bytearray(MESSAGE_HEAD.size) + meta
    data += bytes(-len(data) % 8) + body
    size = len(data) if total is None else total
    MESSAGE_HEAD.pack_into(data, 0, b"TM", version, flags, count, len(meta), reserved, size)
    return bytes(data)


def lz4_payload(blocks, log2=20):
    return struct.pack("<B3x", log2) + b"".join(struct.pack("<I", w) + b for w, b in blocks)


def blockwise_payload(numel, log2=6, code_id=1, reserved=0, table=b""):
    blocks = -(-numel // (1 << log2))
    return struct.pack("<BBH", log2, code_id, reserved) + table + b"\0" * (4 * blocks + numel)


GOOD_LZ4 = lz4.block.compress(bytes(4096), store_size=False)

BAD_RECORDS = {
    "empty": b"",
    "short head": b"TW\x01\x01",
    "bad magic": record(magic=b"XX"),
    "future version": record(version=2),
    "version zero": record(version=0),
    "unknown dtype": record(dtype=11),
    "dtype zero": record(dtype=0),
    "unknown compression": record(codec=5),
    "rank too high": record(shape=(1,) * 9, payload=b"\0" * 4),
    "flags set": record(flags=1),
    "shape truncated": record(shape=(2, 2))[:20],
    "payload truncated": record()[:-1],
    "payload length beyond data": record(length=9),
    "payload length absurd": record(length=2**64 - 1),
    "trailing byte": record() + b"\0",
    "shape and payload disagree": record(shape=(3,)),
    "absurd shape, small payload": record(shape=(2**40, 2**40)),
    "absurd empty shape": record(shape=(0, 2**62, 2**62), payload=b""),
    "float16 on int64": record(dtype=8, codec=1, payload=b"\0" * 4),
    "float16 on float16": record(dtype=2, codec=1, payload=b"\0" * 4),
    "int8_blockwise on int32": record(dtype=7, codec=3, payload=blockwise_payload(2)),
    "bool byte 2": record(dtype=10, shape=(2,), payload=b"\x01\x02"),
    "bool byte 2 under lz4": record(
        dtype=10, codec=4, shape=(1,), payload=lz4_payload([(1 | 1 << 31, b"\x07")])),
    "half payload short": record(codec=1, payload=b"\0" * 3),
    "blockwise short head": record(codec=3, payload=b"\x06"),
    "blockwise block size 32": record(codec=3, payload=blockwise_payload(2, log2=5)),
    "blockwise block size 8192": record(codec=3, payload=blockwise_payload(2, log2=13)),
    "blockwise unknown code id": record(codec=3, payload=blockwise_payload(2, code_id=2)),
    "blockwise reserved set": record(codec=3, payload=blockwise_payload(2, reserved=1)),
    "blockwise explicit table missing": record(codec=3, payload=blockwise_payload(2, code_id=0)),
    "blockwise one byte short": record(codec=3, payload=blockwise_payload(2)[:-1]),
    "blockwise one byte long": record(codec=3, payload=blockwise_payload(2) + b"\0"),
    "lz4 short head": record(codec=4, payload=b"\x14"),
    "lz4 block size too big": record(codec=4, payload=lz4_payload([], log2=25)),
    "lz4 table truncated": record(codec=4, payload=lz4_payload([])),
    "lz4 block past payload": record(codec=4, payload=lz4_payload([(100, b"\0" * 10)])),
    "lz4 raw block wrong size": record(codec=4, payload=lz4_payload([(7 | 1 << 31, b"\0" * 7)])),
    "lz4 bytes after last block": record(
        codec=4, payload=lz4_payload([(8 | 1 << 31, b"\0" * 8)]) + b"\0"),
    "lz4 corrupt block": record(codec=4, payload=lz4_payload([(4, b"\xff\xff\xff\xff")])),
    "lz4 zero-length compressed block": record(codec=4, payload=lz4_payload([(0, b"")])),
    "lz4 decompresses short": record(
        codec=4, shape=(1025,), payload=lz4_payload([(len(GOOD_LZ4), GOOD_LZ4)])),
    "lz4 decompresses long": record(
        codec=4, shape=(1023,), payload=lz4_payload([(len(GOOD_LZ4), GOOD_LZ4)])),
    # 2**37 float32 values (512 GiB) claimed from 100 stored bytes: must fail before allocating.
    "lz4 expansion beyond 256x": record(
        codec=4, shape=(2**37,), payload=lz4_payload([(100, b"\0" * 100)])),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_raises_wire_error(name):
    data = BAD_RECORDS[name]
    for form in (data, bytearray(data), memoryview(data)):
        with pytest.raises(tw.WireError):
            tw.deserialize(form)


def test_the_hand_built_records_are_otherwise_valid():
    """The cases above differ from a valid record in one field only: check the baseline."""
    assert tw.deserialize(record()).tolist() == [0.0, 0.0]
    assert tw.deserialize(record(codec=3, payload=blockwise_payload(2))).tolist() == [0.0, 0.0]
    table = struct.pack("<256f", *range(256))
    explicit = record(codec=3, payload=blockwise_payload(2, code_id=0, table=table))
    assert tw.deserialize(explicit).tolist() == [0.0, 0.0]
    raw = record(codec=4, payload=lz4_payload([(8 | 1 << 31, b"\0" * 8)]))
    assert tw.deserialize(raw).tolist() == [0.0, 0.0]
    packed = record(codec=4, shape=(1024,), payload=lz4_payload([(len(GOOD_LZ4), GOOD_LZ4)]))
    assert tw.deserialize(packed).abs().sum().item() == 0.0
    assert tw.deserialize(record(dtype=10, payload=b"\x01\x00")).tolist() == [True, False]
    assert tw.decode_message(message()) == ([], {})


BAD_MESSAGES = {
    "empty": b"",
    "short head": message()[:10],
    "bad magic": b"TX" + message()[2:],
    "future version": message(version=2),
    "flags set": message(flags=1),
    "reserved set": message(reserved=1),
    "total smaller than data": message(total=16),
    "total larger than data": message(total=40),
    "total absurd": message(total=2**64 - 1),
    "meta longer than message": message(meta=b"\x80" * 9, total=32),
    "meta not msgpack": message(meta=b"\xc1"),
    "meta truncated": message(meta=b"\x81\xa1"),
    "meta not a map": message(meta=b"\x90"),
    "meta with extra bytes": message(meta=b"\x80\x80"),
    "meta with int keys": message(meta=b"\x81\x01\x02"),
    "meta nested too deep": message(meta=b"\x91" * 2000 + b"\x90"),
    "count impossible": message(count=2**32 - 1),
    "count too high": message(body=record(), count=2),
    "count too low": message(body=record(), count=0),
    "nonzero padding": message(meta=b"\x81\xa1a\x01")[:-1] + b"\x01",
    "bad record inside": message(body=record(version=9), count=1),
    "record not padded": message(body=record(shape=(1,), payload=b"\0" * 4), count=1),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_bad_message_raises_wire_error(name):
    with pytest.raises(tw.WireError):
        tw.decode_message(BAD_MESSAGES[name])


def test_messages_reject_what_is_not_bytes():
    strided = memoryview(tw.serialize(torch.zeros(4)) * 2)[::2]
    for value in (None, 3, "text", [1, 2], strided):
        with pytest.raises(tw.WireError):
            tw.decode_message(value)
        with pytest.raises(tw.WireError):
            tw.deserialize(value)


def valid_encodings():
    """A strategy of valid records and messages of every dtype and compression."""

    def build(shape, dtype, codec, seed, as_message):
        tensor = make_tensor(shape, dtype, seed)
        if as_message:
            return tw.encode_message([tensor, tensor], {"k": [1, "v"]}, [codec, "none"])
        return tw.serialize(tensor, codec)

    return st.builds(
        build,
        shapes(max_rank=3, max_numel=200),
        st.sampled_from(DTYPE_NAMES),
        st.sampled_from(COMPRESSION_NAMES),
        st.integers(0, 2**16),
        st.booleans(),
    )


def decode_any(data):
    """Decode with both entry points and size the message from its heads; only WireError may
    escape, any success is fine, but a message that decodes has the size its heads declare."""
    try:
        tw.deserialize(data)
    except tw.WireError:
        pass
    try:
        size = tw.decoded_size(data)
    except tw.WireError:
        size = None
    try:
        tensors, _ = tw.decode_message(data)
    except tw.WireError:
        return
    assert size == sum(t.numel() * t.element_size() for t in tensors)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_wire_error(data):
    decode_any(data)
    decode_any(b"TW\x01" + data)
    decode_any(b"TM\x01\x00" + data)


@FUZZ
@given(
    data=valid_encodings(),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                   max_size=4),
)
def test_mutated_encodings_only_raise_wire_error(data, edits):
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    decode_any(bytes(mutated))
    decode_any(mutated)


@FUZZ
@given(data=valid_encodings(), cut=st.integers(0, 10**6), extra=st.binary(max_size=16))
def test_truncated_or_extended_encodings_raise_wire_error(data, cut, extra):
    cut %= len(data)
    for broken in (data[:cut], data + extra if extra else data[:cut]):
        with pytest.raises(tw.WireError):
            tw.deserialize(broken)
        with pytest.raises(tw.WireError):
            tw.decode_message(broken)


@FUZZ
@given(data=valid_encodings(), edits=st.lists(st.integers(0, 10**6), max_size=3),
       max_chunk=st.integers(1, 64))
def test_assembler_only_raises_wire_error(data, edits, max_chunk):
    mutated = bytearray(data)
    for position in edits:
        mutated[position % len(mutated)] ^= 0xFF
    assembler = tw.ChunkAssembler(limits=tw.Limits(max_message_bytes=1 << 20))
    try:
        for start in range(0, len(mutated), max_chunk):
            assembler.feed(mutated[start : start + max_chunk])
    except tw.WireError:
        assert assembler.done


def test_assembler_checks_the_declared_size_before_allocating():
    huge = message(total=1 << 40)[: MESSAGE_HEAD.size]
    assembler = tw.ChunkAssembler(limits=tw.Limits(max_message_bytes=1 << 30))
    with pytest.raises(tw.WireError, match="limit"):
        assembler.feed(huge)
    assert assembler.done and assembler.expected is None
    with pytest.raises(tw.WireError):  # a failed assembler stays failed
        assembler.feed(b"")


def test_assembler_rejects_bytes_past_the_declared_total():
    data = tw.encode_message([torch.randn(10)], {})
    assembler = tw.ChunkAssembler()
    assert assembler.feed(data[:30]) is None
    assert assembler.expected == len(data)
    with pytest.raises(tw.WireError, match="exceed"):
        assembler.feed(data[30:] + b"\0")


def test_assembler_head_may_arrive_one_byte_at_a_time():
    data = tw.encode_message([torch.randn(10)], {"a": 1})
    assembler = tw.ChunkAssembler()
    for i in range(len(data) - 1):
        assert assembler.feed(data[i : i + 1]) is None
    assert assembler.feed(data[-1:]).meta == {"a": 1}
    with pytest.raises(tw.WireError):  # one message per assembler
        assembler.feed(b"x")


def test_encoder_rejects_what_the_format_cannot_carry():
    with pytest.raises(tw.WireError, match="dtype"):
        tw.serialize(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(tw.WireError, match="rank"):
        tw.serialize(torch.zeros((1,) * 9))
    with pytest.raises(tw.WireError, match="compression"):
        tw.serialize(torch.zeros(2), "zstd")
    with pytest.raises(tw.WireError, match="dense"):
        tw.serialize(torch.zeros(2, 2).to_sparse())
    with pytest.raises(tw.WireError):
        tw.serialize([1.0, 2.0])
    with pytest.raises(tw.WireError, match="compressions"):
        tw.encode_message([torch.zeros(1)], {}, ["none", "lz4"])
    with pytest.raises(tw.WireError, match="msgpack"):
        tw.encode_message([], {"x": object()})
    with pytest.raises(tw.WireError, match="mapping"):
        tw.encode_message([], [("x", 1)])
    with pytest.raises(tw.WireError, match="max_chunk"):
        list(tw.iter_chunks([], max_chunk=0))


def test_decoded_size_limit_caps_what_compressed_payloads_may_expand_to():
    zeros = torch.zeros(1 << 18)  # 1 MiB of float32; lz4 shrinks it about 250-fold
    data = tw.serialize(zeros, "lz4")
    assert len(data) < 8192
    tight = tw.Limits(max_decoded_bytes=(1 << 20) - 1)
    with pytest.raises(tw.WireError, match="decoded-size limit"):
        tw.deserialize(data, limits=tight)
    assert tw.deserialize(data, limits=tw.Limits(max_decoded_bytes=1 << 20)).shape == zeros.shape
    # The limit covers a message's tensors together, and the assembler passes it on.
    message = tw.encode_message([zeros[: 1 << 17], zeros[: 1 << 17]], {}, "lz4")
    with pytest.raises(tw.WireError, match="decoded-size limit"):
        tw.decode_message(message, limits=tight)
    assembler = tw.ChunkAssembler(limits=tight)
    with pytest.raises(tw.WireError, match="decoded-size limit"):
        assembler.feed(message)
