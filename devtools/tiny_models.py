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


def train_head_on_own_outputs(
    target, tokenizer, prompts, sampling_prompt: str, steps: int = 120, seed: int = 0, feature_layers=()
):
    """A head the tiny target accepts most of the time on `prompts` (for tests and GPU smoke runs): the target's own
    layers (so it starts close), trained with the KL to the target on its greedy outputs for `prompts` and on
    sampled continuations of `sampling_prompt`. It has learned these sequences: a test head, not a recipe.
    `feature_layers`: a fused head (pipelines.heads.model) over those target layers beside the last."""
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.heads.model import DraftHead, HeadDraft
    from pipelines.types import GenerationRequest

    torch.manual_seed(seed)
    engine = SpeculativeEngine(target, None, tokenizer, EngineSettings(proposer="none", max_seq_len=160))
    requests = [GenerationRequest(f"g{i}", tokenizer(p).input_ids, max_new_tokens=40) for i, p in enumerate(prompts)]
    sampled = tokenizer(sampling_prompt).input_ids
    requests += [GenerationRequest(f"s{i}", sampled, 8, temperature=0.9, top_p=0.95, seed=i) for i in range(64)]
    sequences = [q.input_ids + r.token_ids for q, r in zip(requests, engine.generate(requests))]
    width = max(len(s) for s in sequences)
    device = next(target.parameters()).device
    tokens = torch.zeros((len(sequences), width), dtype=torch.int64, device=device)
    real = torch.zeros((len(sequences), width), dtype=torch.bool, device=device)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, device=device)
        real[row, : len(sequence)] = True

    head = DraftHead.for_target(
        target, num_layers=target.config.num_hidden_layers, init="random", feature_layers=feature_layers
    )
    hidden = target.config.hidden_size
    with torch.no_grad():
        for mine, theirs in zip(head.layers, target.get_decoder().layers):
            mine.load_state_dict(theirs.state_dict())
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
    draft = HeadDraft(head, target)
    with torch.no_grad():
        features = draft.target_features(tokens)
        log_p = torch.log_softmax(draft.logits(features[..., :hidden]), dim=-1)[:, 1:-1]
    positions = torch.arange(width - 1, device=device).expand(len(sequences), -1)
    scored = real[:, 2:]  # output p (inputs t_{p+1}, f_p) predicts t_{p+2}
    draft.train().requires_grad_(True)
    optimizer = torch.optim.Adam(draft.parameters(), lr=2e-3)
    for _ in range(steps):
        log_q = torch.log_softmax(draft.logits(draft(tokens[:, 1:], features[:, :-1], positions)[:, :-1]), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1)[scored].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval().requires_grad_(False)
