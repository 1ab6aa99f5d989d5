"""Feedback arrays survive packing bit for bit; wrong shapes, dtypes and sizes are refused with the field name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from storage.packing import FEEDBACK_DTYPES, pack_feedback, pack_token_ids, unpack_feedback, unpack_token_ids
from tests.storage_fixtures import make_feedback


def assert_same_feedback(a, b) -> None:
    assert a.draft_version == b.draft_version
    for name in FEEDBACK_DTYPES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bitwise: float16 compared as bits, NaN included


@pytest.mark.parametrize("n, m", [(12, 4), (128, 16), (1, 1), (0, 16)])
def test_round_trip_is_exact(n, m):
    feedback = make_feedback(n=n, m=m, seed=n)
    packed = pack_feedback(feedback)
    assert (packed.prompt_len, packed.n_tokens, packed.top_m) == (5, n, m)
    assert packed.nbytes == 5 * 4 + n * (4 + 1 + 4) + n * m * (4 + 2)
    unpacked = unpack_feedback(packed)
    assert_same_feedback(feedback, unpacked)
    assert unpacked.token_ids.dtype == np.int32 and unpacked.target_topk_logprobs.dtype == np.float16
    unpacked.token_ids[:1] = 7  # writable copies, so torch.from_numpy does not warn


def test_special_float16_values_survive():
    feedback = make_feedback(n=4, m=4)
    feedback.target_topk_logprobs[0] = [-np.inf, np.nan, -0.0, np.finfo(np.float16).min]
    assert_same_feedback(feedback, unpack_feedback(pack_feedback(feedback)))


def test_bytes_are_little_endian():
    feedback = make_feedback(n=2, m=2)
    feedback.token_ids[:] = [1, 256]
    assert pack_feedback(feedback).token_ids == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    big_endian = dataclasses.replace(feedback, token_ids=feedback.token_ids.astype(">i4"))
    assert pack_feedback(big_endian).token_ids == pack_feedback(feedback).token_ids


def test_wrong_dtype_is_refused_not_cast():
    feedback = make_feedback()
    with pytest.raises(ValueError, match="feedback.token_ids: expected dtype int32, got int64"):
        pack_feedback(dataclasses.replace(feedback, token_ids=feedback.token_ids.astype(np.int64)))
    as_float32 = feedback.target_topk_logprobs.astype(np.float32)
    with pytest.raises(ValueError, match="target_topk_logprobs: expected dtype float16, got float32"):
        pack_feedback(dataclasses.replace(feedback, target_topk_logprobs=as_float32))


def test_misaligned_shapes_are_refused():
    feedback = make_feedback(n=6, m=3)
    with pytest.raises(ValueError, match="feedback.kinds: shape"):
        pack_feedback(dataclasses.replace(feedback, kinds=feedback.kinds[:5]))
    with pytest.raises(ValueError, match="feedback.target_topk_logprobs: shape"):
        pack_feedback(dataclasses.replace(feedback, target_topk_logprobs=feedback.target_topk_logprobs[:, :2]))


def test_truncated_blob_is_refused_on_unpack():
    packed = pack_feedback(make_feedback(n=6, m=3))
    damaged = dataclasses.replace(packed, target_topk_ids=packed.target_topk_ids[:-1])
    with pytest.raises(ValueError, match="feedback.target_topk_ids: 71 bytes stored, 72 expected"):
        unpack_feedback(damaged)


def test_token_ids_round_trip():
    ids = [0, 1, 151_935, 2**31 - 1]
    assert unpack_token_ids(pack_token_ids(ids)) == ids
    assert unpack_token_ids(pack_token_ids([])) == []
