# Copyright © 2026 mstream-mlx contributors.
"""Tiny random checkpoints and a tiny tokenizer for tests (no downloads).

The tokenizer is a byte-level BPE trained on a small word list, with the Qwen chat
specials, so ``" -"`` (silence), ``"system"``, ``"user"``, ``"assistant"`` and ``"\\n"``
are single tokens as in Qwen's tokenizer.
"""

from pathlib import Path
from typing import Optional, Sequence

WORDS = (
    "system user assistant you are a helpful what is the answer one two three four "
    "five six seven eight nine zero plus minus times equals hello world yes no maybe "
    "think check feel relate ask drift watch integrate thinking checking feeling "
    "relating asking drifting watching integrating so then first next last sum total"
).split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(folder: Path, vocab_size: int = 512):
    """Train and save a tiny byte-level BPE tokenizer into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [" ".join(WORDS[i:] + WORDS[:i]) + " - - -\n" for i in range(len(WORDS))]
    lines += [w + "\n" for w in WORDS] * 3
    lines += ["system\n", "user\n", "assistant\n", " - -\n"] * 40  # one token each
    tok.train_from_iterator(lines * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def tiny_config(
    model_type: str = "qwen3",
    *,
    num_channels: int = 3,
    tied: bool = True,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
) -> dict:
    return {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tied,
        "num_channels": num_channels,
    }


ARCHITECTURES = {
    # how the reference code names its classes (paper §5, §6, §7; docs/design.md)
    ("qwen3", "blocks"): ["Qwen3ForMultiStream"],
    ("qwen2", "blocks"): ["Qwen2ForMultiStream"],
    ("qwen3", "rows"): ["Qwen3ForCausalLM"],
    ("qwen2", "rows"): ["Qwen2ForCausalLM"],
}


def make_checkpoint(
    folder: Path,
    model_type: str = "qwen3",
    layout: str = "blocks",
    *,
    num_channels: Optional[int] = None,
    tied: bool = True,
    seed: int = 0,
    fmt: str = "safetensors",
    shards: int = 1,
    dtype=None,
    channel_embedding: bool = True,
    heads: Optional[Sequence[str]] = None,
    **config_overrides,
) -> Path:
    """Write a tiny random checkpoint the way the reference training writes it
    (config + weights + tokenizer) and return ``folder``.

    ``heads``: also record the heads that generate (``"multistream": {"heads": ...}``,
    as a converted or fine-tuned folder does); without it a blocks checkpoint runs the
    reference evaluation's one assistant head (docs/generation.md#heads).
    """
    import torch

    from tests.reference.checkpoint import random_state_dict, write_reference_checkpoint

    folder = Path(folder)
    n = num_channels or (10 if layout == "rows" else 3)
    config = tiny_config(model_type, num_channels=n, tied=tied, **config_overrides)
    # std 0.1: attention far from uniform, so positions and masks move the logits
    state = random_state_dict(config, seed=seed, std=0.1)
    if not channel_embedding:
        state.pop("model.channel_embedding.weight")
        config.pop("num_channels")
    if heads is not None:
        config["multistream"] = {"heads": list(heads)}
    write_reference_checkpoint(
        folder,
        config,
        state,
        fmt=fmt,
        shards=shards,
        dtype=dtype or torch.float32,
        architectures=ARCHITECTURES[(model_type, layout)],
    )
    make_tokenizer(folder)
    return folder
