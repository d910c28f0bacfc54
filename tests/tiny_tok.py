"""A tiny character-level tokenizer built in memory, for tests with tiny models (vocab_size=96).

Vocabulary (75 ids): 5 specials (``<pad>``=0, ``<eos>``=1, ``<unk>``=2, ``<|user|>``=3,
``<|assistant|>``=4), then space, newline, a-z, 0-9 and ASCII punctuation. Text is lowercased first;
any other character becomes ``<unk>``. Decoding joins characters without spaces.

Chat template::

    [system text\\n] <|user|>content\\n <|assistant|>content<eos>\\n ...
    (+ <|assistant|> as the generation prompt)

so the turn-end token is ``<eos>`` (= eos_token).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>")
CHARS = " \n" + string.ascii_lowercase + string.digits + string.punctuation

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + '<eos>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_tokenizer(with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (no files, no network); vocab size 75 (< 96)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    assert len(vocab) == len(SPECIALS) + len(CHARS) <= 96
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # every character is its own pre-token; [\s\S] also matches newlines
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if with_chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok
