"""Tiny real models for tests and CPU smoke runs of the benchmarks: built in-process, saved with save_pretrained,
loaded back through from_pretrained like any model folder.

The target and draft share one tokenizer (a small byte-level BPE trained here on a fixed text), so the
pair behaves like a real draft/target pair with a common vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TRAINING_TEXT = (
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"
    "The quick brown fox jumps over the lazy dog. SELECT name FROM users WHERE id = 1;\n"
    "To be, or not to be, that is the question. All the world's a stage.\n"
) * 20


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, layers: int, hidden: int, eos_token_id: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def make_model_dir(path: Path, tokenizer, layers: int, hidden: int, seed: int, init_std: float = 0.5) -> Path:
    """Save a randomly initialised Qwen2 model with the given tokenizer; return the directory.

    A large init std gives peaked (low-entropy) distributions, so greedy outputs are not dominated by ties and
    a draft can agree with the target often enough to exercise acceptance.
    """
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), layers, hidden, tokenizer.eos_token_id)
    config.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """A 4-layer target and a 2-layer draft sharing one tokenizer; returns (target_dir, draft_dir)."""
    tokenizer = build_tokenizer()
    target = make_model_dir(root / "target", tokenizer, layers=4, hidden=64, seed=1)
    draft = make_model_dir(root / "draft", tokenizer, layers=2, hidden=32, seed=2)
    return target, draft


def make_noisy_copy(source: Path, path: Path, noise: float, seed: int) -> Path:
    """A draft that agrees with the target most of the time: the target's weights plus Gaussian noise of `noise`
    times each tensor's own standard deviation, saved like any other model."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.numel() > 1:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * noise * tensor.std())
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(path)
    return path
