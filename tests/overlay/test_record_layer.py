"""The record layer alone: sealing, and reading records split anywhere across socket reads."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.record_layer import MAX_RECORD_PLAINTEXT, RecordError, RecordReader, seal_records
from overlay.secure_handshake import SecureHandshake


def transports():
    a = SecureHandshake(Identity.generate(), initiator=True, rng=os.urandom)
    b = SecureHandshake(Identity.generate(), initiator=False, rng=os.urandom)
    for _ in range(3):
        b.receive_data(a.data_to_send()) if not b.is_complete else None
        a.receive_data(b.data_to_send()) if not a.is_complete else None
    return a.result().transport, b.result().transport


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 100, 4096, MAX_RECORD_PLAINTEXT]), min_size=1,
                      max_size=6),
       cuts=st.lists(st.integers(1, 70000), max_size=12))
def test_records_split_anywhere_come_back_in_order(sizes, cuts):
    sender, receiver = transports()
    plaintexts = [os.urandom(n) for n in sizes]
    wire = bytes(seal_records(sender, plaintexts))
    reader = RecordReader(receiver)
    got, pos = [], 0
    for cut in cuts:
        got += reader.feed(wire[pos:pos + cut])
        pos = min(len(wire), pos + cut)
    got += reader.feed(wire[pos:])
    assert got == plaintexts


def test_one_byte_at_a_time_and_forgery():
    sender, receiver = transports()
    wire = bytes(seal_records(sender, [b"hello", b"world" * 1000]))
    reader = RecordReader(receiver)
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i:i + 1])
    assert got == [b"hello", b"world" * 1000]
    forged = bytearray(seal_records(sender, [b"x" * 50]))
    forged[10] ^= 1
    with pytest.raises(RecordError, match="authentication"):
        reader.feed(bytes(forged[:7]) + bytes(forged[7:]))
    with pytest.raises(RecordError, match="shorter than its tag"):
        RecordReader(receiver).feed(b"\x00\x05abcde")
