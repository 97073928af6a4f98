"""Base58btc (the Bitcoin alphabet), as used for libp2p peer ids in text form."""

ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


class Base58Error(ValueError):
    """Raised for text that is not valid base58btc."""


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(ALPHABET[r])
    out.extend(b"1" * zeros)
    out.reverse()
    return out.decode("ascii")


def b58decode(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as e:
        raise Base58Error(f"not base58: {text!r}") from e
    n = 0
    for c in raw:
        digit = _INDEX.get(c)
        if digit is None:
            raise Base58Error(f"invalid base58 character {chr(c)!r} in {text!r}")
        n = n * 58 + digit
    zeros = len(raw) - len(raw.lstrip(b"1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body
