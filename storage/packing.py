"""Feedback arrays <-> raw little-endian bytes, exactly.

A feedback row stores each array of `pipelines.types.RequestFeedback` as the bytes of a fixed dtype, plus the
three lengths that give the shapes back (P prompt tokens, n emitted tokens, m top-m entries). No pickle, no
compression: packing is a memcpy, and about 6m + 10 bytes per emitted token (106 B for m = 16). `draft_sources`
(who drafted each position) is optional: None for feedback recorded before it existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.types import RequestFeedback

# column -> little-endian dtype; shapes: prompt_ids [P], per-token arrays [n], top-m arrays [n, m]
FEEDBACK_DTYPES: dict[str, np.dtype] = {
    "prompt_ids": np.dtype("<i4"),
    "token_ids": np.dtype("<i4"),
    "kinds": np.dtype("u1"),
    "draft_tokens": np.dtype("<i4"),
    "target_topk_ids": np.dtype("<i4"),
    "target_topk_logprobs": np.dtype("<f2"),
}
PER_TOKEN = ("token_ids", "kinds", "draft_tokens")
SOURCES_DTYPE = np.dtype("u1")
TOP_M = ("target_topk_ids", "target_topk_logprobs")


@dataclass(frozen=True)
class PackedFeedback:
    """Column values of one feedback row (everything but ids, times and counters)."""

    prompt_len: int  # P
    n_tokens: int  # n
    top_m: int  # m
    prompt_ids: bytes
    token_ids: bytes
    kinds: bytes
    draft_tokens: bytes
    target_topk_ids: bytes
    target_topk_logprobs: bytes
    draft_version: str
    draft_sources: bytes | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(getattr(self, name)) for name in FEEDBACK_DTYPES) + len(self.draft_sources or b"")

    def columns(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def pack_array(values: np.ndarray, dtype: np.dtype, name: str = "array") -> bytes:
    """Bytes of `values` in `dtype`; refuses another dtype rather than cast (a silent int64 -> int32 cast could
    wrap, and a float32 -> float16 one would round)."""
    values = np.asarray(values)
    if values.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise ValueError(f"{name}: expected dtype {dtype.name}, got {values.dtype.name}")
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpack_array(blob: bytes, dtype: np.dtype, shape: tuple[int, ...], name: str = "array") -> np.ndarray:
    """A writable native-endian array of `shape` from bytes written by pack_array."""
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(blob) != expected:
        raise ValueError(f"{name}: {len(blob)} bytes stored, {expected} expected for shape {shape} {dtype.name}")
    return np.frombuffer(blob, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))  # astype copies


def pack_feedback(feedback: RequestFeedback) -> PackedFeedback:
    prompt_len = int(np.shape(feedback.prompt_ids)[0])
    n = int(np.shape(feedback.token_ids)[0])
    topk_shape = np.shape(feedback.target_topk_ids)
    m = int(topk_shape[1]) if len(topk_shape) == 2 else -1
    for name in PER_TOKEN:
        if np.shape(getattr(feedback, name)) != (n,):
            raise ValueError(f"feedback.{name}: shape {np.shape(getattr(feedback, name))}, expected ({n},)")
    for name in TOP_M:
        if np.shape(getattr(feedback, name)) != (n, m) or m < 0:
            raise ValueError(f"feedback.{name}: shape {np.shape(getattr(feedback, name))}, expected ({n}, m)")
    if np.ndim(feedback.prompt_ids) != 1:
        raise ValueError(f"feedback.prompt_ids: shape {np.shape(feedback.prompt_ids)}, expected (P,)")
    blobs = {
        name: pack_array(getattr(feedback, name), dtype, f"feedback.{name}") for name, dtype in FEEDBACK_DTYPES.items()
    }
    sources = None
    if feedback.draft_sources is not None:
        if np.shape(feedback.draft_sources) != (n,):
            raise ValueError(f"feedback.draft_sources: shape {np.shape(feedback.draft_sources)}, expected ({n},)")
        sources = pack_array(feedback.draft_sources, SOURCES_DTYPE, "feedback.draft_sources")
    return PackedFeedback(
        prompt_len=prompt_len, n_tokens=n, top_m=m, draft_version=feedback.draft_version, draft_sources=sources, **blobs
    )


def unpack_feedback(row) -> RequestFeedback:
    """RequestFeedback from anything with PackedFeedback's attributes (a `storage.models.Feedback` row)."""
    shapes = {
        "prompt_ids": (row.prompt_len,),
        **{name: (row.n_tokens,) for name in PER_TOKEN},
        **{name: (row.n_tokens, row.top_m) for name in TOP_M},
    }
    arrays = {
        name: unpack_array(getattr(row, name), dtype, shapes[name], f"feedback.{name}")
        for name, dtype in FEEDBACK_DTYPES.items()
    }
    blob = getattr(row, "draft_sources", None)
    sources = None if blob is None else unpack_array(blob, SOURCES_DTYPE, (row.n_tokens,), "feedback.draft_sources")
    return RequestFeedback(draft_version=row.draft_version, draft_sources=sources, **arrays)


def pack_token_ids(token_ids) -> bytes:
    return pack_array(np.asarray(token_ids, dtype=np.int32), FEEDBACK_DTYPES["token_ids"], "token_ids")


def unpack_token_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype=FEEDBACK_DTYPES["token_ids"]).tolist()
