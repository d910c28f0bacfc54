"""The model of --dry-run-tiny: a random 30-layer Llama with a character-level chat tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

_TINY_CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + '<eos>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer():
    """A character-level chat tokenizer (no files, no network): ids 0-74."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>")
    chars = " \n" + string.ascii_lowercase + string.digits + string.punctuation
    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(specials + tuple(chars))}, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = _TINY_CHAT
    return tok


def build_tiny_model(folder: Path, n_layers: int) -> Path:
    """A random Llama (d=32, ``n_layers`` layers) with a character-level chat tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layercard.artifacts import atomic_path

    tok = char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return folder
