"""Streamed text equals the finished text: spaces kept, split characters never shown halved."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.text_stream import PROMPT_CONTEXT_TOKENS, TextStream
from tests.tokenizer_factory import CORPUS, byte_level, sentencepiece_style

TOKENIZERS = {"sentencepiece_style": sentencepiece_style(), "byte_level": byte_level()}


def streamed(tokenizer, prompt: list[int], new: list[int], per_push: int = 1) -> list[str]:
    stream = TextStream(tokenizer.decode, context=prompt[-PROMPT_CONTEXT_TOKENS:])
    pieces = [stream.push(new[i:i + per_push]) for i in range(0, len(new), per_push)]
    return [*pieces, stream.finish()]


def continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """What the new tokens add to the prompt's text in the finished decode."""
    return tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)):]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("per_push", [1, 2, 5])
def test_stream_equals_the_finished_text(name, per_push):
    tokenizer = TOKENIZERS[name]
    for text in CORPUS:
        ids = tokenizer(text).input_ids
        for cut in (1, len(ids) // 3, len(ids) - 1):
            prompt, new = ids[:cut], ids[cut:]
            pieces = streamed(tokenizer, prompt, new, per_push)
            assert "".join(pieces) == continuation(tokenizer, prompt, new)
            if text.isascii() or name == "sentencepiece_style":
                continue
            assert not any("\ufffd" in p for p in pieces)  # no half characters shown


def test_decoding_tokens_one_by_one_would_be_wrong():
    """Why the stream exists (and proof that the test above can fail): decoded alone, a
    SentencePiece token loses its space, a byte token of a split character is U+FFFD."""
    spaced = TOKENIZERS["sentencepiece_style"]
    ids = spaced("hello world").input_ids
    assert "".join(spaced.decode([i]) for i in ids) != spaced.decode(ids)
    assert spaced.decode(ids[:1]) == "hello"
    assert "".join(streamed(spaced, ids[:1], ids[1:])) == " world"
    nonascii = TOKENIZERS["byte_level"]
    ids = nonascii("世界 🙂").input_ids
    assert any("\ufffd" in nonascii.decode([i]) for i in ids)


def test_an_unfinished_character_is_held_back_until_the_end():
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer("🙂").input_ids
    assert len(ids) > 1  # split over byte tokens
    stream = TextStream(tokenizer.decode)
    assert stream.push(ids[:1]) == ""
    assert stream.finish() == tokenizer.decode(ids[:1])  # as the finished decode shows it


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab cé世🙂.,\n", min_size=2, max_size=40), st.data())
def test_any_text_streams_to_its_decode(text, data):
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer(text).input_ids
    cut = data.draw(st.integers(0, len(ids) - 1))
    per_push = data.draw(st.integers(1, 4))
    prompt, new = ids[:cut], ids[cut:]
    assert "".join(streamed(tokenizer, prompt, new, per_push)) == \
        continuation(tokenizer, prompt, new)
