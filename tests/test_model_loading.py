"""Model folders are saved in bfloat16 by bench.fetch_models; on a CPU the daemon still computes in float32:
dtype auto upcasts at load, exactly (every bfloat16 value is a float32 value)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from pipelines.models import load_model


def test_a_bfloat16_folder_loads_as_float32_on_cpu_with_the_same_values(tiny_models, tmp_path):
    target_dir, _ = tiny_models
    saved = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16)
    saved.save_pretrained(tmp_path / "bf16")
    assert saved.dtype == torch.bfloat16

    loaded = load_model(str(tmp_path / "bf16"), dtype="auto", device="cpu")
    assert loaded.dtype == torch.float32
    expected = saved.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.float32)), name
    assert load_model(str(tmp_path / "bf16"), dtype="bfloat16").dtype == torch.bfloat16  # asked for: kept
