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

from devtools.tiny_models import make_noisy_copy, make_tiny_pair, train_head_on_own_outputs

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
        return train_head_on_own_outputs(self.target, self.tokenizer, PROMPTS, SAMPLING_PROMPT)

    @cached_property
    def fused_head(self):
        """A head like `head`, fused over the target's layers 1 and 2 beside its last (EAGLE-3 fusion)."""
        return train_head_on_own_outputs(self.target, self.tokenizer, PROMPTS, SAMPLING_PROMPT, feature_layers=(1, 2))

    @cached_property
    def reduced_head(self):
        """The test head with a reduced draft vocabulary: the more frequent half of the tokens in the test prompts
        and the target's greedy answers to them, so some of the target's choices are tokens it cannot propose."""
        from tests.head_fixtures import half_of_the_tokens, with_draft_vocab

        prompts = [self.tokenizer(p).input_ids for p in [*PROMPTS, SAMPLING_PROMPT]]
        answers = [self.reference_greedy(ids, 24) for ids in prompts]
        return with_draft_vocab(self.head, half_of_the_tokens(prompts + answers))


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
