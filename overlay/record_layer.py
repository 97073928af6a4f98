"""Noise transport records on the socket: a 2-byte big-endian length, then the ciphertext.

Sans-IO: `RecordReader.feed` turns received bytes into plaintexts, `seal_records` turns a plaintext
byte string into framed records. Each record carries at most MAX_RECORD_PLAINTEXT bytes (a
Noise message is at most 65535 bytes, 16 of which are the authentication tag).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from overlay.mux.connection import MAX_RECORD_PLAINTEXT

TAG_SIZE = 16
_LENGTH = struct.Struct(">H")


class RecordError(Exception):
    """A record that fails authentication or is malformed: the connection must end."""


class Cipher(Protocol):
    def encrypt_into(self, plaintext: bytes | memoryview, out: memoryview) -> int: ...

    def decrypt(self, ciphertext: bytes | memoryview) -> bytes: ...


def seal_records(cipher: Cipher, plaintexts: Sequence[bytes]) -> bytearray:
    """Encrypt each plaintext (at most MAX_RECORD_PLAINTEXT bytes) into one framed record.

    The records are sealed in place into one buffer sized up front: the ciphertext is written
    once, where the socket will read it (no per-record bytes objects joined afterwards).
    """
    out = bytearray(sum(len(p) for p in plaintexts) + len(plaintexts) * (2 + TAG_SIZE))
    view = memoryview(out)
    pack_into = _LENGTH.pack_into
    encrypt_into = cipher.encrypt_into
    pos = 0
    for plaintext in plaintexts:
        size = len(plaintext) + TAG_SIZE
        pack_into(out, pos, size)
        encrypt_into(plaintext, view[pos + 2:pos + 2 + size])
        pos += 2 + size
    return out


class RecordReader:
    """Reassembles framed records from a byte stream and decrypts them in order."""

    __slots__ = ("_buffer", "_cipher")

    def __init__(self, cipher: Cipher):
        self._cipher = cipher
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Plaintexts of the records completed by `data`, in order.

        Only the start of a record that straddles two reads is copied (at most one record);
        everything else is decrypted straight from the received bytes.
        """
        view = memoryview(data)
        out = []
        decrypt = self._cipher.decrypt
        pos = 0
        buffer = self._buffer
        if buffer:
            if len(buffer) < 2:
                take = min(2 - len(buffer), len(view))
                buffer += view[:take]
                pos = take
                if len(buffer) < 2:
                    return out
            (length,) = _LENGTH.unpack_from(buffer)
            if length < TAG_SIZE:
                raise RecordError(f"record of {length} bytes is shorter than its tag")
            take = min(2 + length - len(buffer), len(view) - pos)
            buffer += view[pos:pos + take]
            pos += take
            if len(buffer) < 2 + length:
                return out
            try:
                out.append(decrypt(memoryview(buffer)[2:]))
            except Exception as e:  # the cipher's own authentication failure type
                raise RecordError(f"record failed authentication: {type(e).__name__}") from None
            self._buffer = bytearray()
        total = len(view)
        while total - pos >= 2:
            (length,) = _LENGTH.unpack_from(view, pos)
            if length < TAG_SIZE:
                raise RecordError(f"record of {length} bytes is shorter than its tag")
            end = pos + 2 + length
            if end > total:
                break
            try:
                out.append(decrypt(view[pos + 2:end]))
            except Exception as e:  # the cipher's own authentication failure type
                raise RecordError(f"record failed authentication: {type(e).__name__}") from None
            pos = end
        if pos < total:
            self._buffer += view[pos:]
        return out


__all__ = ["MAX_RECORD_PLAINTEXT", "Cipher", "RecordError", "RecordReader", "seal_records"]
