"""The two kinds of draft that learning trains, stores and replays, told apart here for everything outside the
tensor code (the learners and the replay tell them apart in pipelines.learners.distill and pipelines.replay):

    draft   a small causal LM with the target's tokenizer (a transformers PreTrainedModel)
    head    an EAGLE-style head over the target's features (pipelines.heads.model.HeadDraft)

The names are storage.models.DraftKind's values and the proposers' names (pipelines.types.SOURCE_NAMES), so a
checkpoint row's `kind` says which proposer's live counters judge it.

A checkpoint file holds the draft's state dict (a head's: keys "head.*", the target's embeddings and LM head are not
in it) and, in its safetensors metadata, one key "draft": JSON with `kind` and, for a head, its HeadConfig
(`head_config`, as asdict gives it): a stored head can be checked against the served one, and rebuilt for its target
(DraftHead.from_state), without the folder it came from. One key with sorted JSON, because safetensors writes its
metadata map in no fixed order: with several keys the same weights could hash to another sha256.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import torch

from pipelines.heads.model import (
    HeadConfig,
    HeadDraft,
    check_draft_vocab,
    check_head_fits_config,
    head_config_from_document,
)

DRAFT_MODEL = "draft"
HEAD = "head"


class DraftMismatchError(ValueError):
    """Stored weights that do not fit the draft being served: another kind, a head of another shape or for another
    target architecture, missing or extra tensors. They are refused before anything is copied."""


def kind_of(draft: torch.nn.Module) -> str:
    return HEAD if isinstance(draft, HeadDraft) else DRAFT_MODEL


def weights_metadata(draft: torch.nn.Module) -> dict[str, str]:
    """What a checkpoint of `draft` records beside its tensors (module docstring)."""
    description = {"kind": kind_of(draft)}
    if isinstance(draft, HeadDraft):
        description["head_config"] = asdict(draft.config)
    return {"draft": json.dumps(description, sort_keys=True, default=str)}


def description_of(metadata: dict[str, str]) -> dict:
    """The "draft" document of a checkpoint's metadata ({} for files written before it existed)."""
    return json.loads(metadata["draft"]) if "draft" in metadata else {}


def head_config_of(metadata: dict[str, str]) -> HeadConfig | None:
    """The HeadConfig stored in a head checkpoint's metadata, None for any other file."""
    description = description_of(metadata)
    if description.get("kind") != HEAD or "head_config" not in description:
        return None
    return head_config_from_document(description["head_config"])


def check_weights_fit(
    kind: str,
    metadata: dict[str, str],
    state: dict[str, torch.Tensor],
    served: dict[str, str],
    served_state: dict[str, torch.Tensor],
    label: str = "checkpoint",
) -> None:
    """Raise DraftMismatchError unless weights of `kind` with `metadata` and `state` can replace the served draft's
    (described by `served`, weights_metadata of it, and `served_state`, its state dict)."""
    served_kind = description_of(served).get("kind", DRAFT_MODEL)
    if kind != served_kind:
        raise DraftMismatchError(f"{label} is a {kind}, the served draft is a {served_kind}")
    if kind == HEAD:
        stored, mine = head_config_of(metadata), head_config_of(served)
        if stored is None:
            raise DraftMismatchError(f"{label} is a head without its head config in the file's metadata")
        if stored.num_layers != mine.num_layers:
            layers = f"{stored.num_layers} layers, the served one has {mine.num_layers}"
            raise DraftMismatchError(f"{label} is a head of {layers}")
        try:
            check_head_fits_config(stored, mine.target_config)
        except ValueError as exc:
            raise DraftMismatchError(f"{label}: {exc}") from None
        layers = state.get("head.feature_layers")
        read = list(stored.feature_layers) if layers is None else layers.tolist()
        if read != list(stored.feature_layers) or read != list(mine.feature_layers):
            # same shapes, other streams: the served engine's verify pass returns the served head's layers only
            raise DraftMismatchError(
                f"{label} is a head fused over target layers {read} (its config says {list(stored.feature_layers)}), "
                f"the served head reads {list(mine.feature_layers)}"
            )
        vocab = state.get("head.draft_vocab")
        if vocab is not None:
            try:
                check_draft_vocab(vocab, int(mine.target_config["vocab_size"]))
            except ValueError as exc:
                raise DraftMismatchError(f"{label}: {exc}") from None
    missing, unexpected = sorted(set(served_state) - set(state)), sorted(set(state) - set(served_state))
    misshapen = sorted(n for n in set(state) & set(served_state) if state[n].shape != served_state[n].shape)
    if missing or unexpected or misshapen:
        raise DraftMismatchError(
            f"{label} does not fit the served {kind}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {misshapen[:3]}"
        )


def training_device(draft: torch.nn.Module, configured: str) -> str:
    """Where a learning round trains `draft`: the configured device, except for a head, which reads the target's
    embeddings and LM head and so trains where the target is."""
    if isinstance(draft, HeadDraft):
        return str(next(draft.target.parameters()).device)
    return configured


def training_dtype(draft: torch.nn.Module, dtype: str) -> torch.dtype:
    """The dtype a learning round trains `draft` in: a draft LM in `dtype` ("auto": its own), a head in its own
    (training_copy says why)."""
    if isinstance(draft, HeadDraft):
        return next(draft.parameters()).dtype
    return draft.dtype if dtype == "auto" else getattr(torch, dtype)


def training_copy(draft: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """An independent copy of the served draft to train: a draft LM on `device` in `dtype` ("auto": its own); a
    head in its own dtype on the target's device (its input mixes the target's embeddings with the target's
    features, which must share its dtype: the learners' float32 masters give it float32 steps anyway)."""
    if isinstance(draft, HeadDraft):
        return draft.copy_for_training()
    return copy.deepcopy(draft).to(device=device, dtype=training_dtype(draft, dtype))
