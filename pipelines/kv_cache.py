"""A static KV cache whose slot index is the token's absolute position, row by row.

Every row of a batch has its own length. A forward pass writes the keys and values of input token t of row b
into slot `positions[b, t]` and attends to slots `<= positions[b, t]`. Rolling back rejected draft tokens is
therefore free: the next pass simply writes over them, and the mask never lets a query see a slot beyond its
own position. Buffers are allocated once (for the largest batch) and sliced per batch size, so CUDA graphs
captured for a batch size keep pointing at the same memory.

It implements the one method the transformers decoder layers call on a cache: `update(key, value, layer_idx)`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "onlinespec_sdpa"


class PositionalKVCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys = keys  # per layer [B, kv_heads, S, head_dim]
        self.values = values
        self.positions: torch.Tensor | None = None  # [B, T] int64, set before each forward

    @classmethod
    def allocate(cls, model: PreTrainedModel, batch_size: int, max_seq_len: int) -> PositionalKVCache:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads
        param = next(model.parameters())
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        make = lambda: torch.zeros(shape, dtype=param.dtype, device=param.device)  # noqa: E731
        layers = config.num_hidden_layers
        return cls([make() for _ in range(layers)], [make() for _ in range(layers)])

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, batch_size: int) -> PositionalKVCache:
        """A view of the first `batch_size` rows sharing this cache's memory."""
        return PositionalKVCache([k[:batch_size] for k in self.keys], [v[:batch_size] for v in self.values])

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value: [B, kv_heads, T, head_dim] for the tokens at self.positions [B, T]
        index = self.positions[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        self.keys[layer_idx].scatter_(2, index, key)
        self.values[layer_idx].scatter_(2, index, value)
        return self.keys[layer_idx], self.values[layer_idx]


class RowSubsetCache:
    """Some rows of a PositionalKVCache, for a forward over those rows alone (a newcomer's prefill, a proposer
    catching up): keys and values are written straight into the full cache at (row, position); a forward reads the
    rows' own slots. The engine's other rows are untouched, whatever phase they are in."""

    def __init__(self, cache: PositionalKVCache, rows: torch.Tensor):
        self.cache = cache
        self.rows = rows  # [n] int64 row indices into the full cache
        self.positions: torch.Tensor | None = None  # [n, T]

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # advanced indices (rows, positions) around a slice put their dims first: [n, T, kv_heads, head_dim]
        where = (self.rows[:, None], slice(None), self.positions)
        self.cache.keys[layer_idx][where] = key.transpose(1, 2)
        self.cache.values[layer_idx][where] = value.transpose(1, 2)
        return self.cache.keys[layer_idx][self.rows], self.cache.values[layer_idx][self.rows]


def padded_width(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (the widths of variable-width forwards, see pad_tokens)."""
    return -(-width // multiple) * multiple


def catch_up_positions(lengths: list[int], width: int, device) -> torch.Tensor:
    """[n, width] positions 0..L-1 of each row for a catch-up forward, right-padded rows clamped to their own L - 1
    (padding rewrites a real position with the same input)."""
    ends = torch.tensor(lengths, dtype=torch.int64, device=device)
    return torch.arange(width, device=device).expand(len(lengths), -1).minimum(ends[:, None] - 1).clamp_min(0)


def attention_mask(positions: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[B, 1, T, S] boolean mask: query (b, t) sees slots 0..positions[b, t]."""
    slots = torch.arange(max_seq_len, device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


def decoder_forward(model: PreTrainedModel, compile: bool = False, feature_layers: tuple[int, ...] = ()):
    """forward(tokens [B, T], positions [B, T], cache) -> last hidden states [B, T, H] (or [B, T, F], below) of the
    model's decoder, writing the tokens' keys and values into `cache` at their positions. The LM head is applied by
    the caller, to the positions it needs (to `[..., :H]`). With `feature_layers` the result is F = H * (1 + n)
    wide: the last hidden state, then the residual stream after each of those layers (stacked_features: what a fused
    head reads). With `compile` the decoder call goes through torch.compile (one static shape per batch size and
    width; the cache's positions are set outside the compiled region)."""
    decoder = model.get_decoder()
    feature_layers = tuple(feature_layers)

    def run_decoder(tokens, positions, mask, cache):
        output = decoder(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=hidden_states_wanted(feature_layers),
        )
        return stacked_features(output, feature_layers)

    if compile:
        # One static shape per (batch size, tokens per forward): more than Dynamo's default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        run_decoder = torch.compile(run_decoder, fullgraph=True, dynamic=False)

    def forward(tokens: torch.Tensor, positions: torch.Tensor, cache: PositionalKVCache | RowSubsetCache):
        cache.positions = positions
        return run_decoder(tokens, positions, attention_mask(positions, cache.max_seq_len), cache)

    return forward


def hidden_states_wanted(feature_layers: tuple[int, ...]) -> list[int] | bool:
    """transformers' `output_hidden_states` for stacked_features: the 0-based indices of the decoder layers whose
    outputs it needs (only those are kept: all of them would hold L + 1 hidden states through the forward), or
    False."""
    return [n - 1 for n in feature_layers] if feature_layers else False


def stacked_features(output, feature_layers: tuple[int, ...]) -> torch.Tensor:
    """[B, T, H * (1 + n)] of a decoder output run with output_hidden_states=hidden_states_wanted(feature_layers):
    its last hidden state (after the final norm), then the residual stream after the first `feature_layers[i]`
    decoder layers (the output of layer feature_layers[i] - 1, before any norm)."""
    if not feature_layers:
        return output.last_hidden_state
    return torch.cat([output.last_hidden_state, *(output.hidden_states[n - 1] for n in feature_layers)], dim=-1)


def _sdpa_with_gqa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    # transformers' own sdpa path repeats grouped KV heads whenever a mask is given; SDPA can broadcast them
    # itself (enable_gqa), which avoids materialising a [B, heads, S, D] copy per layer per step.
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        # transformers passes no mask when plain causal masking will do (training, HF generate).
        is_causal=attention_mask is None and query.shape[2] > 1,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _sdpa_with_gqa)
# Outside the engine (training, HF generate) the model builds its own masks: the same ones as for sdpa.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
