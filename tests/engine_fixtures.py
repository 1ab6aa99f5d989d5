"""Models for engine tests: the tiny target through our engine, the same target on transformers' own attention as
the reference, a weak draft (random, rarely accepted) and a strong one (the target plus a little noise, accepted
most of the time, so accepted, recovered and bonus tokens all occur)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from devtools.tiny_models import make_noisy_copy, make_tiny_pair

# Relative weight noise of the strong draft: greedy acceptance ~65-75% with k = 4 on the tiny target.
STRONG_DRAFT_NOISE = 0.004


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
