"""Models for engine tests: the tiny target through our engine, the same target on transformers' own attention as
the reference, a weak draft (random, rarely accepted), a strong one (the target plus a little noise, accepted most
of the time, so accepted, recovered and bonus tokens all occur) and a strong head (trained here, briefly, on the
target's own outputs for the test prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pytest
import torch
from transformers import AutoModelForCausalLM

from devtools.tiny_models import make_noisy_copy, make_tiny_pair

# Relative weight noise of the strong draft: greedy acceptance ~65-75% with k = 4 on the tiny target.
STRONG_DRAFT_NOISE = 0.004
PROMPTS = [
    "def add(a, b):",
    "The quick brown",
    "SELECT name FROM users WHERE",
    "To be, or not to be, that is the question. All the world's",
    "for i in range(10):\n    print(",
    "T",
    "All the world's a stage. The quick brown fox jumps over",
    "return a +",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\nSELECT name FROM users WHERE id = 1;",
]
SAMPLING_PROMPT = "The quick brown"


@dataclass
class EngineModels:
    target: torch.nn.Module  # loaded by pipelines.models (our attention function and KV cache)
    reference: torch.nn.Module  # the same weights on transformers' stock eager attention
    weak_draft: torch.nn.Module
    strong_draft: torch.nn.Module
    tokenizer: object

    def reference_greedy(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            output = self.reference.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return output[0, len(input_ids) :].tolist()

    @cached_property
    def head(self):
        """A head the target accepts most of the time on the test prompts (greedy ~70-85%): the target's own layers
        (so it starts close), trained on the target's greedy outputs for PROMPTS and sampled continuations of
        SAMPLING_PROMPT. A test head, not a recipe: it has learned these sequences."""
        return train_test_head(self.target, self.tokenizer)


def train_test_head(target, tokenizer, steps: int = 120, seed: int = 0):
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.heads.model import DraftHead, HeadDraft, target_features
    from pipelines.types import GenerationRequest

    torch.manual_seed(seed)
    engine = SpeculativeEngine(target, None, tokenizer, EngineSettings(proposer="none", max_seq_len=160))
    requests = [GenerationRequest(f"g{i}", tokenizer(p).input_ids, max_new_tokens=40) for i, p in enumerate(PROMPTS)]
    sampled = tokenizer(SAMPLING_PROMPT).input_ids
    requests += [GenerationRequest(f"s{i}", sampled, 8, temperature=0.9, top_p=0.95, seed=i) for i in range(64)]
    sequences = [q.input_ids + r.token_ids for q, r in zip(requests, engine.generate(requests))]
    width = max(len(s) for s in sequences)
    tokens = torch.zeros((len(sequences), width), dtype=torch.int64)
    real = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        real[row, : len(sequence)] = True

    head = DraftHead.for_target(target, num_layers=target.config.num_hidden_layers, init="random")
    hidden = target.config.hidden_size
    with torch.no_grad():
        for mine, theirs in zip(head.layers, target.get_decoder().layers):
            mine.load_state_dict(theirs.state_dict())
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(torch.eye(hidden))
    draft = HeadDraft(head, target)
    with torch.no_grad():
        features = target_features(target, tokens)
        log_p = torch.log_softmax(target.get_output_embeddings()(features).float(), dim=-1)[:, 1:-1]
    positions = torch.arange(width - 1).expand(len(sequences), -1)
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


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory) -> EngineModels:
    from pipelines.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("engine-models")
    target_dir, draft_dir = make_tiny_pair(root)
    strong_dir = make_noisy_copy(target_dir, root / "strong", STRONG_DRAFT_NOISE, seed=3)
    reference = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32, attn_implementation="eager")
    return EngineModels(
        target=load_model(str(target_dir)),
        reference=reference.eval(),
        weak_draft=load_model(str(draft_dir)),
        strong_draft=load_model(str(strong_dir)),
        tokenizer=load_tokenizer(str(target_dir)),
    )
