"""Text of a generation as it grows, token by token, exactly as the finished text decodes.

Decoding each new token alone is wrong for most tokenizers: SentencePiece-style ones (Llama,
Mistral) drop the leading space of a token decoded on its own ("▁world" -> "world"), and a
character split over several byte-level tokens decodes to U+FFFD halves. So the stream keeps
the ids and decodes a short window of them twice: the window before the new tokens and the
window with them; what the second adds to the first is the new text. Text that ends in an
incomplete character is held back until the tokens that complete it arrive (or the end).
The window starts at the tokens whose text was returned last (their context is what a
decoder looks at: the space before a word, the bytes before a continuation byte), so each step
decodes a few ids, not the whole generation. Pure: the tokenizer's `decode` is the only call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"
# Ours: prompt ids given as context; a space or a character split over byte tokens (at most
# 4 bytes in UTF-8) needs no more.
PROMPT_CONTEXT_TOKENS = 4


class TextStream:
    """Feed it new token ids, get the text they add; `finish()` returns what was held back.

    `context`: the prompt's last ids, so that the first new token decodes as it follows the
    prompt (with its space), not as the start of a text."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read")

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()):
        self._decode = decode
        self._ids: list[int] = [int(i) for i in context]
        self._prefix = 0  # the window starts here
        self._read = len(self._ids)  # text of ids before this index has been returned

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in ids)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith(_INCOMPLETE):
            return ""  # nothing printable yet (a character still incomplete)
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]

    def finish(self) -> str:
        """Whatever the last tokens add, even an incomplete character (as the full decode
        shows it)."""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._read = len(self._ids)
        return now[len(before):]
