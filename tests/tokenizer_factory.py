"""Small tokenizers trained in the test itself (nothing is downloaded), of the two kinds models use.

- ``sentencepiece_style``: BPE over Metaspace pieces ("▁world"), as Llama and Mistral tokenize:
  a token decoded alone loses its leading space.
- ``byte_level``: GPT-2's byte-level BPE: a character of several UTF-8 bytes may be split over
  tokens, each of which decodes alone to U+FFFD.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "a swarm of servers runs the blocks of one model; the client keeps the head.",
    "héllo wörld: naïve café, 世界 and 🙂 are several bytes each.",
]


def _fast(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def sentencepiece_style(vocab_size: int = 100) -> PreTrainedTokenizerFast:
    """At most `vocab_size` ids (the test models' vocabulary is 128)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS[:2] * 20, trainer)
    return _fast(tokenizer)


def byte_level(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return _fast(tokenizer)
