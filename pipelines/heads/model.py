"""An EAGLE-style draft head: a few decoder layers of the target's own architecture over the target's features.

Terms. The target's *feature* f_p at position p is its last hidden state there, after the final norm (what its LM
head reads to predict token t_{p+1}). The head reads, at position p, the feature f_p and the embedding of the token
at p + 1, and predicts the feature at p + 1 (whose logits, through the target's LM head, give token t_{p+2}):

    x_p  = fc([embed(t_{p+1}); f_p])              [.., 2H] -> [.., H]
    g_p  = norm(layers(x_p)) at position p         causal over the head's own positions (its KV cache)
    logits of t_{p+2} = lm_head(g_p)               the target's LM head, frozen

The head's final norm (the target's norm class, initialised from the target's final norm) puts g in the space of
the features it estimates, so step j >= 2 can read it in place of a target feature.

Drafting k tokens after a verified prefix whose last token `current` sits at position L: step 1 reads the true
f_{L-1} and embed(current) at position L - 1 and gives d_1; step j >= 2 reads the head's own previous output g in
place of a target feature, and embed(d_{j-1}), at position L + j - 2, and gives d_j (EAGLE's feature-level
autoregression). Only the head's own modules are trained and stored (`fc`, its layers and norm, a fused head's
`fuse` and its norms): the embeddings and the LM head are the target's, so a head checkpoint is small (one layer of
a 1.5B target: ~52M parameters) and can only serve the target it was trained against (checkpoints record the
target identity).

Draft vocabulary. The LM head over the target's whole vocabulary is most of a head step's cost (one GEMM reading
151,936 x 1,536 weights per drafted position: ~0.15 ms on an H100 at batch 1, BENCHMARKS.md section 6). A head may
carry a reduced draft vocabulary (`draft_vocab`: the token ids it can propose, e.g. the corpus's most frequent 32k,
as EAGLE-3 does): drafting then scores only those rows of the LM head, proposes the best of them, and reports its q
over the whole vocabulary with zeros elsewhere, so verification stays lossless. `draft init` trains over the draft
vocabulary too unless told `--loss-vocab whole` (`draft_logits`; pipelines.heads.losses draft_vocab_only), as
the online learners' chain term does; their step-1 KL is over the whole one (`logits`). The ids are stored with
the head's weights.

Fused features (EAGLE-3). With `feature_layers` (e.g. (2, 14) of a 28-layer target) the target's feature at p is
F_p = [f_p; h^a_p; h^b_p]: the last hidden state, then the residual streams after those decoder layers (lower
layers still carry what the token is, the last one mostly what comes next). Where the head reads a target feature
(step 1, catch-up, training) it reads fuse(F_p) = W [f_p; norm_a(h^a_p); norm_b(h^b_p)] in place of f_p; step
j >= 2 reads its own output g as before. A fresh fused head starts with W = [I | 0 | 0], so it begins as exactly
the unfused head and training decides what the lower layers add. The target's verify pass and prefill return the
whole F (pipelines.kv_cache.decoder_forward), so fusion costs no extra target forward; the layer indices are a
buffer of the head's weights, so a head fused over other layers cannot be swapped into a serving engine.

The layers are the target's decoder-layer class built from a copy of the target's config, so attention, rotary
embeddings and norms are exactly the target's, and the engine's positional KV cache (pipelines.kv_cache) works
for the head as it does for any decoder.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from pipelines.kv_cache import (
    ATTENTION_NAME,
    PositionalKVCache,
    attention_mask,
    hidden_states_wanted,
    stacked_features,
)

HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    """What a head is, stored beside its weights. `target_config` is the target's config (a dict), from which the
    layers are built; `init` says how the layers started (recorded, not used after construction)."""

    num_layers: int
    target_config: dict
    init: str = "last_layer"  # "last_layer": a copy of the target's last decoder layer; "random"
    draft_vocab_size: int = 0  # token ids the head may propose (its `draft_vocab` buffer); 0 = the whole vocabulary
    feature_layers: tuple[int, ...] = ()  # fused target layers (module docstring); () = the last hidden state only

    def __post_init__(self) -> None:
        layers = tuple(int(i) for i in self.feature_layers)
        object.__setattr__(self, "feature_layers", layers)  # JSON gives a list
        depth = int(self.target_config.get("num_hidden_layers", 0))
        if any(not 1 <= i < depth for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(
                f"feature_layers {list(layers)}: distinct increasing layer counts in 1..{depth - 1} "
                f"(the target has {depth} decoder layers; the last one's output is always read)"
            )

    @property
    def hidden_size(self) -> int:
        return int(self.target_config["hidden_size"])

    @property
    def feature_size(self) -> int:
        """Width of one target feature row: H, or H * (1 + len(feature_layers)) for a fused head."""
        return self.hidden_size * (1 + len(self.feature_layers))

    def layer_config(self) -> PretrainedConfig:
        config = type_of_config(self.target_config).from_dict(copy.deepcopy(self.target_config))
        config.num_hidden_layers = self.num_layers
        config.layer_types = ["full_attention"] * self.num_layers
        config._attn_implementation = ATTENTION_NAME
        return config


def type_of_config(config_dict: dict) -> type[PretrainedConfig]:
    from transformers import AutoConfig

    return type(AutoConfig.for_model(config_dict["model_type"]))


class DraftHead(torch.nn.Module):
    """fc + decoder layers + rotary embedding of the target's architecture; see the module docstring."""

    def __init__(self, config: HeadConfig, classes: tuple[type, type, type]):
        """classes: the target's (decoder layer, final norm, rotary embedding) classes (`target_classes`)."""
        layer_class, norm_class, rotary_class = classes
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        layer_config = config.layer_config()
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=True)
        self.layers = torch.nn.ModuleList(layer_class(layer_config, i) for i in range(config.num_layers))
        self.norm = norm_class(hidden, eps=layer_config.rms_norm_eps)
        self.rotary_emb = rotary_class(config=layer_config)
        if config.feature_layers:  # EAGLE-3 fusion (module docstring)
            self.fuse_norms = torch.nn.ModuleList(
                norm_class(hidden, eps=layer_config.rms_norm_eps) for _ in config.feature_layers
            )
            self.fuse = torch.nn.Linear(config.feature_size, hidden, bias=False)
            # which target layers the fusion reads: stored with the weights, compared on every swap (never trained)
            self.register_buffer("feature_layers", torch.tensor(config.feature_layers, dtype=torch.int64))
        if config.draft_vocab_size:  # sorted token ids, stored with the weights (never trained)
            self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        else:
            self.draft_vocab = None

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] the target's embeddings of t_{p+1}
        features: torch.Tensor,  # [B, T, F] the target's (F = config.feature_size) or [B, T, H] the head's own g
        positions: torch.Tensor,  # [B, T] int64, p
        cache: PositionalKVCache | None = None,
        mask: torch.Tensor | None = None,  # [B, 1, T, S] bool: which of the cache's keys each query sees
    ) -> torch.Tensor:
        """[B, T, H] g_p. With `cache` the keys and values go to the cache at `positions` and a query sees the
        cache's slots <= its position (the engine's drafting); without, plain causal attention over T (training,
        teacher forcing over right-padded rows). An explicit `mask` goes with a cache of another layout (any object
        with `update(key, value, layer_idx)`: the unrolled training of pipelines.heads.losses)."""
        features = features.to(embeds.dtype)
        width, hidden = features.shape[-1], self.config.hidden_size
        if width not in (hidden, self.config.feature_size):
            raise ValueError(f"a head reads features {hidden} or {self.config.feature_size} wide, got {width}")
        if width != hidden:  # the target's fused feature; the head's own g is H wide
            features = self.fused(features)
        hidden = self.fc(torch.cat([embeds, features], dim=-1))
        if mask is None and cache is not None:
            cache.positions = positions
            mask = attention_mask(positions, cache.max_seq_len)
        position_embeddings = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return self.norm(hidden)

    def fused(self, features: torch.Tensor) -> torch.Tensor:
        """[.., H] fuse(F) of fused target features [.., F]: each lower layer's stream normalised (their scales
        differ by orders of magnitude from the final norm's output), then one projection."""
        last, *lower = features.split(self.config.hidden_size, dim=-1)
        return self.fuse(torch.cat([last, *(norm(h) for norm, h in zip(self.fuse_norms, lower))], dim=-1))

    def allocate_cache(self, batch_size: int, max_seq_len: int) -> PositionalKVCache:
        """A positional KV cache of the head's layers (the target's head_dim and KV heads)."""
        param = next(self.parameters())
        shell = _ConfigShell(self.config.layer_config(), param)
        return PositionalKVCache.allocate(shell, batch_size, max_seq_len)

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def for_target(
        cls,
        target: PreTrainedModel,
        num_layers: int = 1,
        init: str = "last_layer",
        seed: int = 0,
        draft_vocab: list[int] | torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
    ):
        """A fresh head for `target`, on the target's device and in its dtype. init "last_layer" copies the target's
        last decoder layer into every head layer (a warm start: it already maps late features to late features);
        "random" keeps the layer class's own initialisation. fc starts as [0 | I]: the feature passes through; the
        norm starts as the target's final norm. `draft_vocab`: the token ids it may propose (None: all).
        `feature_layers`: fuse these target layers with the last (module docstring); fuse starts as [I | 0]."""
        if init not in ("last_layer", "random"):
            raise ValueError(f"Unknown head init {init!r}; use 'last_layer' or 'random'")
        decoder = target.get_decoder()
        vocab = None if draft_vocab is None else _checked_vocab(draft_vocab, target.get_output_embeddings())
        config = HeadConfig(
            num_layers=num_layers,
            target_config=target.config.to_dict(),
            init=init,
            draft_vocab_size=0 if vocab is None else len(vocab),
            feature_layers=tuple(feature_layers),
        )
        torch.manual_seed(seed)
        head = cls(config, target_classes(target))
        hidden = config.hidden_size
        with torch.no_grad():
            if vocab is not None:
                head.draft_vocab.copy_(vocab)
            head.fc.weight.zero_()
            head.fc.weight[:, hidden:].copy_(torch.eye(hidden))
            head.fc.bias.zero_()
            if config.feature_layers:
                head.fuse.weight.zero_()
                head.fuse.weight[:, :hidden].copy_(torch.eye(hidden))
            head.norm.load_state_dict(decoder.norm.state_dict())
            if init == "last_layer":
                source = decoder.layers[-1].state_dict()
                for layer in head.layers:
                    layer.load_state_dict(source)
        param = next(target.parameters())
        return head.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)

    @classmethod
    def from_state(cls, target: PreTrainedModel, config: HeadConfig, state: dict[str, torch.Tensor]) -> DraftHead:
        """A head of `config` for `target` with the given weights (strict: every tensor, right shapes)."""
        head = cls(config, target_classes(target))
        param = next(target.parameters())
        head = head.to(device=param.device, dtype=param.dtype)
        head.load_state_dict(state, strict=True)
        if config.feature_layers and head.feature_layers.tolist() != list(config.feature_layers):
            raise ValueError(
                f"a head's weights read target layers {head.feature_layers.tolist()}, "
                f"its config says {list(config.feature_layers)}"
            )
        if head.draft_vocab is not None:  # duplicates would lose q's mass, an id out of range fault on the GPU
            check_draft_vocab(head.draft_vocab, target.get_output_embeddings().weight.shape[0])
        return head.eval().requires_grad_(False)

    def save(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """A head folder: head_config.json (+ metadata) and head.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        document = {"kind": "head", **asdict(self.config), "metadata": metadata or {}}
        (folder / HEAD_CONFIG_FILE).write_text(json.dumps(document, indent=1, default=str))
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, folder / HEAD_WEIGHTS_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, target: PreTrainedModel) -> DraftHead:
        from safetensors.torch import load_file

        config, _ = read_head_config(folder)
        state = load_file(Path(folder) / HEAD_WEIGHTS_FILE)
        return cls.from_state(target, config, state)


def target_classes(target: PreTrainedModel) -> tuple[type, type, type]:
    """The target's decoder-layer, final-norm and rotary-embedding classes: what a head of it is built from."""
    decoder = target.get_decoder()
    return type(decoder.layers[0]), type(decoder.norm), type(decoder.rotary_emb)


def is_head_folder(ref: str | Path | None) -> bool:
    return ref is not None and (Path(ref).expanduser() / HEAD_CONFIG_FILE).is_file()


def read_head_config(folder: str | Path) -> tuple[HeadConfig, dict]:
    """(HeadConfig, metadata) of a head folder."""
    document = json.loads((Path(folder).expanduser() / HEAD_CONFIG_FILE).read_text())
    if document.get("kind") != "head":
        raise ValueError(f"{folder}: {HEAD_CONFIG_FILE} does not describe a head")
    return head_config_from_document(document), document.get("metadata", {})


def head_config_from_document(document: dict) -> HeadConfig:
    """The HeadConfig of a head_config.json document (or of asdict(config), as checkpoints store it)."""
    return HeadConfig(
        num_layers=int(document["num_layers"]),
        target_config=document["target_config"],
        init=document["init"],
        draft_vocab_size=int(document.get("draft_vocab_size", 0)),  # heads stored before draft vocabularies: 0
        feature_layers=tuple(document.get("feature_layers", ())),  # heads stored before fusion: the last layer
    )


def flat_tokens(sequences: list[list[int]]) -> torch.Tensor:
    """[N] int64: every token of every sequence, in order."""
    return torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.int64)


def most_frequent_tokens(sequences: list[list[int]], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` token ids that occur most often in `sequences` (ties: lower id first), sorted: a draft vocabulary.
    Ids that never occur fill the rest, lowest first, so the size is exact."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens: it must be 1..{vocab_size} (the target's vocabulary)")
    tokens = flat_tokens(sequences)
    counts = torch.bincount(tokens[(tokens >= 0) & (tokens < vocab_size)], minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id
    return order[:size].sort().values


def _checked_vocab(draft_vocab: list[int] | torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    vocab = torch.as_tensor(draft_vocab, dtype=torch.int64).flatten().unique()  # sorted, no repeats
    check_draft_vocab(vocab, lm_head.weight.shape[0])
    return vocab


def check_draft_vocab(vocab: torch.Tensor, rows: int) -> None:
    """Refuse a draft vocabulary that is not strictly increasing token ids in 0..rows - 1 (stored ones too)."""
    ids = vocab.detach().cpu()
    if len(ids) == 0 or int(ids[0]) < 0 or int(ids[-1]) >= rows or not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"a draft vocabulary must be strictly increasing token ids in 0..{rows - 1}")


def check_head_fits(config: HeadConfig, target: PreTrainedModel) -> None:
    """Refuse a head built for another architecture or width (its weights would not even load)."""
    check_head_fits_config(config, target.config.to_dict())


def check_head_fits_config(config: HeadConfig, target_config: dict) -> None:
    """check_head_fits against a target's config dict (e.g. the one a served head was built from)."""
    mine, theirs = config.target_config, target_config
    keys = ["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"]
    if config.feature_layers:  # it reads the target's layers by index
        keys.append("num_hidden_layers")
    for key in keys:
        if mine.get(key) != theirs.get(key):
            raise ValueError(
                f"head does not fit the target: {key} is {mine.get(key)!r}, the target's {theirs.get(key)!r}"
            )


class _ConfigShell:
    """What PositionalKVCache.allocate reads from a model: its config and one parameter (dtype, device)."""

    def __init__(self, config: PretrainedConfig, param: torch.Tensor):
        self.config = config
        self._param = param

    def parameters(self):
        yield self._param


def target_features(
    target: PreTrainedModel, input_ids: torch.Tensor, feature_layers: tuple[int, ...] = ()
) -> torch.Tensor:
    """[B, T, F] the target's features by teacher forcing, no cache: the last hidden state after the final norm
    (F = H), then with `feature_layers` the residual stream after each of those layers (pipelines.kv_cache
    .stacked_features, as the engine's verify pass returns them). The causal mask is given explicitly: without one,
    transformers checks the positions for packed sequences, a host sync per call."""
    width = input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()[None, None]
    output = target.get_decoder()(
        input_ids=input_ids,
        attention_mask=causal,
        use_cache=False,
        output_hidden_states=hidden_states_wanted(tuple(feature_layers)),
    )
    return stacked_features(output, tuple(feature_layers))


class HeadDraft(torch.nn.Module):
    """A head bound to the target it reads: what the engine drafts with, the learners train and checkpoints hold.

    Its parameters and state_dict are the head's alone (keys "head.*"); the target is referenced, not owned (it is
    not a submodule), so training, copying and storing a HeadDraft never touches the target's weights."""

    kind = "head"

    def __init__(self, head: DraftHead, target: PreTrainedModel):
        super().__init__()
        self.head = head
        self._target = (target,)  # a tuple: nn.Module would otherwise register the target as a submodule
        self._draft_lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # draft_logits' rows of the LM head

    @property
    def target(self) -> PreTrainedModel:
        return self._target[0]

    @property
    def config(self) -> HeadConfig:
        return self.head.config

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.target.get_input_embeddings()(tokens)

    def target_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, F] what this head reads of the target by teacher forcing (module function target_features)."""
        return target_features(self.target, input_ids, self.config.feature_layers)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Logits (float32), over the target's whole vocabulary, of the token after the one each head output g
        predicts the feature of (the online learners' step-1 KL, and the bootstrap with the whole-vocabulary loss)."""
        return self.target.get_output_embeddings()(outputs).float()

    # drafting: over the draft vocabulary when the head has one (module docstring)

    def draft_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """[.., V'] float32 logits over the draft vocabulary (the whole one, V' = V, without a reduced one)."""
        if self.head.draft_vocab is None:
            return self.logits(outputs)
        if self._draft_lm_head is None:
            self.refresh_drafting()
        weight, bias = self._draft_lm_head
        return torch.nn.functional.linear(outputs, weight, bias).float()

    def draft_token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into draft_logits' last dimension."""
        vocab = self.head.draft_vocab
        return index if vocab is None else vocab[index]

    def full_vocab(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, T, V] probabilities of [B, T, V'] draft-vocabulary ones: zero on every token the head cannot
        propose."""
        vocab = self.head.draft_vocab
        if vocab is None:
            return probs
        rows = self.target.get_output_embeddings().weight.shape[0]
        full = torch.zeros((*probs.shape[:-1], rows), dtype=probs.dtype, device=probs.device)
        return full.scatter_(-1, vocab.expand(*probs.shape[:-1], -1), probs)

    def only_draft_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[.., V] whole-vocabulary logits with every token outside the draft vocabulary at -inf: their softmax is
        the q drafting samples from, their argmax what it proposes (replay's teacher-forced estimates)."""
        vocab = self.head.draft_vocab
        if vocab is None:
            return logits
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[vocab] = True
        return logits.masked_fill(~allowed, float("-inf"))

    def refresh_drafting(self) -> None:
        """(Re)build the LM head rows of the draft vocabulary from the target, in place once built (captured graphs
        keep pointing at them): after the head's draft_vocab changed (a weight swap, load_state_dict)."""
        vocab = self.head.draft_vocab
        if vocab is None:
            self._draft_lm_head = None
            return
        check_draft_vocab(vocab, self.target.get_output_embeddings().weight.shape[0])
        lm_head = self.target.get_output_embeddings()
        weight = lm_head.weight.detach()[vocab]
        bias = None if lm_head.bias is None else lm_head.bias.detach()[vocab]
        if self._draft_lm_head is None:
            self._draft_lm_head = (weight.contiguous(), bias)
            return
        if self._draft_lm_head[0].shape != weight.shape:  # unreachable through swap (copy_weights checks shapes)
            raise ValueError("a head's draft vocabulary cannot change size once its LM head rows exist")
        self._draft_lm_head[0].copy_(weight)
        if bias is not None:
            self._draft_lm_head[1].copy_(bias)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, then the draft vocabulary's LM head rows follow the loaded ids (a learning round reloads
        its training copy this way)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._draft_lm_head is not None:
            self.refresh_drafting()
        return result

    def forward(self, tokens, features, positions, cache=None, mask=None) -> torch.Tensor:
        """g for inputs (embed(tokens), features) at positions: see DraftHead.forward."""
        return self.head(self.embed(tokens), features, positions, cache, mask)

    def restricted_to(self, draft_vocab: list[int] | torch.Tensor) -> HeadDraft:
        """A copy of this head (the same weights) that proposes only the token ids in `draft_vocab`."""
        return self._with_vocab(_checked_vocab(draft_vocab, self.target.get_output_embeddings()))

    def with_whole_vocab(self) -> HeadDraft:
        """A copy of this head (the same weights) that may propose any token: what a draft vocabulary costs in
        acceptance is the difference between the two on the same rows."""
        return self._with_vocab(None)

    def _with_vocab(self, vocab: torch.Tensor | None) -> HeadDraft:
        config = replace(self.config, draft_vocab_size=0 if vocab is None else len(vocab))
        state = {name: t for name, t in self.head.state_dict().items() if name != "draft_vocab"}
        if vocab is not None:
            state["draft_vocab"] = vocab
        return HeadDraft(DraftHead.from_state(self.target, config, state), self.target)

    def copy_for_training(self) -> HeadDraft:
        """An independent copy of the head (same target), e.g. the learning round's training copy."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo) -> HeadDraft:
        # copy.deepcopy of a head copies the head, never the target it reads
        return HeadDraft(copy.deepcopy(self.head, memo), self.target)
