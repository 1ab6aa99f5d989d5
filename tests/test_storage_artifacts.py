"""Checkpoint store: a real model's weights round-trip bit for bit; a changed or truncated file is refused."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from storage.artifacts import TEMP_PREFIX, TEMP_SUFFIX, CheckpointStore
from storage.errors import CheckpointIntegrityError, CheckpointNotFoundError


def tiny_qwen2(path, tie_word_embeddings=False, seed=0):
    """Built in-process, saved with save_pretrained and loaded back through from_pretrained."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_bit_exact(expected: dict, actual: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.uint8), tensor.detach().contiguous().view(torch.uint8)), name


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "checkpoints")


def test_real_model_round_trip_is_bit_exact(store, tmp_path):
    model = tiny_qwen2(tmp_path / "draft")
    state = model.state_dict()
    sha256, path, size = store.put(state, {"version": "v1", "window": [1, 99]})
    assert path == store.root / f"{sha256}.safetensors" and path.stat().st_size == size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root ignores modes)
    loaded = store.get(sha256, expected_size=size)
    assert_bit_exact(state, loaded)
    model.load_state_dict(loaded)  # and it is a usable state dict
    assert store.verify(sha256) == size


def test_tied_embeddings_round_trip(store, tmp_path):
    model = tiny_qwen2(tmp_path / "tied", tie_word_embeddings=True)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    sha256, _, _ = store.put(state)
    assert_bit_exact(state, store.get(sha256))


def test_dtypes_views_and_dedup(store):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "half": torch.tensor([float("nan"), -0.0, 65504.0], dtype=torch.float16),
        "transposed": base.t(),  # not contiguous
        "row": base[1],  # shares storage with `transposed`
        "int": torch.tensor([2**40], dtype=torch.int64),
    }
    first = store.put(state, {"note": "x"})
    assert_bit_exact(state, store.get(first.sha256))
    again = store.put(state, {"note": "x"})
    assert again == first  # same bytes, same address, stored once
    assert len(list(store.root.iterdir())) == 1


def test_tampered_file_is_refused(store):
    sha256, path, size = store.put({"w": torch.ones(64, 64)})
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[size // 2] ^= 0x01  # one bit in the middle of the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=f"damaged.*hash to [0-9a-f]{{64}}, not {sha256}"):
        store.get(sha256)
    with pytest.raises(CheckpointIntegrityError):
        store.verify(sha256)


def test_truncated_file_is_refused(store):
    sha256, path, size = store.put({"w": torch.ones(64, 64)})
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointIntegrityError, match=f"its {size - 100} bytes, {size} expected"):
        store.get(sha256, expected_size=size)


def test_a_damaged_copy_is_replaced_by_a_fresh_put(store):
    state = {"w": torch.ones(8)}
    sha256, path, _ = store.put(state)
    os.chmod(path, 0o644)
    path.write_bytes(b"garbage")
    store.put(state)
    assert_bit_exact(state, store.get(sha256))


def test_missing_and_malformed_addresses(store):
    with pytest.raises(CheckpointNotFoundError):
        store.get("0" * 64)
    with pytest.raises(ValueError, match="not a sha256"):
        store.get("../../etc/passwd")


def test_cleanup_removes_only_stale_temp_files(store):
    sha256, path, _ = store.put({"w": torch.ones(4)})
    stale = store.root / f"{TEMP_PREFIX}dead{TEMP_SUFFIX}"
    fresh = store.root / f"{TEMP_PREFIX}writing{TEMP_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.cleanup_temp() == [stale]
    assert fresh.exists() and path.exists()
    assert store.cleanup_temp(min_age_seconds=0) == [fresh]
    assert [p.name for p in store.root.iterdir()] == [path.name]


def test_failed_write_leaves_nothing_behind(store, monkeypatch):
    import storage.artifacts

    def crash(path):
        assert path.name.startswith(TEMP_PREFIX) and path.exists()  # the temp file was written
        raise OSError("disk full")

    monkeypatch.setattr(storage.artifacts, "_hash_and_sync", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="not a tensor"):
        store.put({"w": torch.ones(2), "oops": [1, 2]})
    assert list(store.root.iterdir()) == []
