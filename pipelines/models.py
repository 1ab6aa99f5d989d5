"""Loading target and draft models through transformers, and checking that they can work together."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipelines.kv_cache import ATTENTION_NAME

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEW_HEAD = "new-head"  # models.draft: a fresh head for the target, trained by learning rounds from traffic


class IncompatibleModelsError(ValueError):
    """The draft cannot serve this target (different vocabulary or tokenizer)."""


class ModelLoadError(RuntimeError):
    """A model reference could not be loaded."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_reference(ref: str) -> None:
    """Refuse at once a reference that can only be a local path and is not there: without this check the hub
    client answers a mistyped folder with "Repo id must be in the form ..." (or a network error), after the
    other model may already have spent half a minute loading. A hub id is `name` or `org/name`, nothing else."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.suffix == ".gguf" and not path.is_file():
            raise ModelLoadError(f"{ref} is not a GGUF file")
        return
    looks_like_path = path.suffix == ".gguf" or ref.startswith((".", "/", "~")) or ref.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"no such model folder or file: {ref}")


def _split_reference(ref: str) -> tuple[str, dict]:
    """A GGUF file loads from its folder with gguf_file=...; anything else is a folder or hub id."""
    check_reference(ref)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path) if path.exists() else ref, {}


def load_model(ref: str, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM for inference from a local HF folder (safetensors), a .gguf file, or a hub id."""
    source, extra = _split_reference(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype, device), attn_implementation=ATTENTION_NAME, **extra
        )
    except (OSError, ValueError) as exc:
        raise _load_error(ref, "model", exc) from exc
    if getattr(model.config, "use_sliding_window", False):
        raise ModelLoadError(f"{ref}: sliding-window attention is not supported by the speculative engine")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    source, extra = _split_reference(ref)
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(ref, "tokenizer", exc) from exc


def _load_error(ref: str, what: str, exc: BaseException) -> ModelLoadError:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    if not Path(ref).expanduser().exists():  # it was tried as a hub id
        return ModelLoadError(f"no such model folder or file: {ref} (as a hub id: {reason})")
    return ModelLoadError(f"could not load the {what} of {ref}: {reason}")


def check_compatible(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    target_tokenizer: PreTrainedTokenizerBase,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise IncompatibleModelsError unless the draft's token ids mean what the target's mean."""
    target_vocab = target.get_output_embeddings().weight.shape[0]
    draft_vocab = draft.get_output_embeddings().weight.shape[0]
    if target_vocab != draft_vocab:
        raise IncompatibleModelsError(
            f"draft and target must share a vocabulary: the target's output layer has {target_vocab} token ids, "
            f"the draft's {draft_vocab}"
        )
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise IncompatibleModelsError("draft and target tokenizers map tokens to different ids")


def model_identity(model: PreTrainedModel) -> str:
    """A stable hash of a model's config and weights: a draft trained against one target must not serve another."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_pair(
    target_ref: str,
    draft_ref: str | None,
    dtype: str = "auto",
    device: str = "cpu",
    head_layers: int = 1,
    head_feature_layers: tuple[int, ...] = (),
):
    """Load target, optional draft and the target's tokenizer; refuse a draft that does not fit the target.
    Both references are checked before either model loads.

    The draft is a draft LM (a folder, .gguf or hub id), a head folder (`onlinespec draft init --kind head`), or
    NEW_HEAD: a fresh head of `head_layers` layers for this target, fused over `head_feature_layers` beside its
    last layer (pipelines.heads.model), which learning rounds train from traffic.
    Returns (target, draft LM or pipelines.heads.model.HeadDraft or None, tokenizer)."""
    from pipelines.heads.model import is_head_folder

    head = draft_ref == NEW_HEAD or is_head_folder(draft_ref)
    for ref in (target_ref, None if head else draft_ref):
        if ref:
            check_reference(ref)
    tokenizer = load_tokenizer(target_ref)
    target = load_model(target_ref, dtype, device)
    draft = None
    if head:
        if head_feature_layers and draft_ref != NEW_HEAD:
            log.warning("models.head_feature_layers applies to new-head only; %s carries its own layers", draft_ref)
        draft = load_head(draft_ref, target, head_layers, head_feature_layers)
    elif draft_ref:
        draft = load_model(draft_ref, dtype, device)
        check_compatible(target, draft, tokenizer, load_tokenizer(draft_ref))
    log.info("loaded target %s%s on %s", target_ref, f" and draft {draft_ref}" if draft_ref else "", device)
    return target, draft, tokenizer


def load_head(ref: str, target: PreTrainedModel, layers: int = 1, feature_layers: tuple[int, ...] = ()):
    """A HeadDraft on `target`: read from a head folder (refused if built for another architecture or width), or
    NEW_HEAD: a fresh one (its first decoder layer copied from the target's last, pipelines.heads.model), fused
    over `feature_layers` (refused if the target has no such layers)."""
    from pipelines.heads.model import DraftHead, HeadDraft, check_head_fits, read_head_config

    if ref == NEW_HEAD:
        try:
            return HeadDraft(DraftHead.for_target(target, num_layers=layers, feature_layers=feature_layers), target)
        except ValueError as exc:
            raise IncompatibleModelsError(f"a new head for {target.config.model_type}: {exc}") from None
    config, _ = read_head_config(ref)
    try:
        check_head_fits(config, target)
    except ValueError as exc:
        raise IncompatibleModelsError(f"{ref}: {exc}") from None
    return HeadDraft(DraftHead.load(ref, target), target)
