"""Tiny random causal LMs built from config classes (no hub), one per supported family.

``from tiny import tiny_model, tiny_tokenizer`` in tests. Every model builds in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "gpt2", "gpt_neox")
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64


def tiny_config(
    family: str, *, vocab_size: int = 96, hidden: int = 32, layers: int = 4, **kw: Any
) -> PretrainedConfig:
    """Config for a tiny ``family`` model; ``kw`` overrides any config field."""
    head_dim = hidden // HEADS
    # Special tokens inside the tiny vocabulary: some configs default to ids past it (Phi-3 pad 32000).
    tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    llama_like = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        **tokens,
    )
    if family == "llama":
        cfg: PretrainedConfig = LlamaConfig(**llama_like)
    elif family == "mistral":
        cfg = MistralConfig(**llama_like, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**llama_like)
    elif family == "qwen3":
        cfg = Qwen3Config(**llama_like, head_dim=head_dim)
    elif family == "gemma":
        cfg = GemmaConfig(**llama_like, head_dim=head_dim)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            **llama_like, head_dim=head_dim, sliding_window=8, query_pre_attn_scalar=head_dim
        )
    elif family == "phi3":
        cfg = Phi3Config(**llama_like)
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=128,
            **tokens,
        )
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            max_position_embeddings=128,
            **tokens,
        )
    else:
        raise ValueError(f"tiny_config: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    family: str, *, vocab_size: int = 96, hidden: int = 32, layers: int = 4, seed: int = 0, **kw: Any
) -> PreTrainedModel:
    """A random float32 causal LM of ``family`` in eval mode, deterministic for a given ``seed``."""
    cfg = tiny_config(family, vocab_size=vocab_size, hidden=hidden, layers=layers, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def tiny_multimodal(layers: int = 4, vision_layers: int = 2) -> torch.nn.Module:
    """A tiny Gemma 3 with a vision tower: its text layers are model.language_model.layers, and the
    vision encoder's own layers.N hold self_attn.q_proj / v_proj too."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=28,
    )
    cfg = Gemma3Config(
        text_config=tiny_config("gemma3", layers=layers).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(cfg).eval()


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: specials, letters a-z, then words w0, w1, ... up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [*specials, *"abcdefghijklmnopqrstuvwxyz"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_tiny_gguf(
    path: str | Path, *, hidden: int = 32, layers: int = 2, ff: int = 64, heads: int = 4, kv_heads: int = 2
) -> Path:
    """A tiny float32 Llama GGUF with a byte-level BPE vocabulary and a chat template (about 100 KB)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    alphabet = sorted(set(bytes_to_unicode().values()))
    tokens = ["<s>", "</s>", *alphabet, "he"]  # transformers wants at least one merge
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")

    def rand(*shape: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    d = hidden // heads
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    for i in range(layers):
        for name, shape in {
            "attn_norm": (hidden,),
            "ffn_norm": (hidden,),
            "attn_q": (heads * d, hidden),
            "attn_k": (kv_heads * d, hidden),
            "attn_v": (kv_heads * d, hidden),
            "attn_output": (hidden, heads * d),
            "ffn_gate": (ff, hidden),
            "ffn_up": (ff, hidden),
            "ffn_down": (hidden, ff),
        }.items():
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + rand(*shape) if len(shape) == 1 else rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def fixed_logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on a fixed 2 × 10 batch, in eval mode and without grad (its mode is restored)."""
    ids = torch.arange(5, 25).reshape(2, 10)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out
