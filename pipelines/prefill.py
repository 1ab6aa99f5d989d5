"""The target's prefill forward over some rows of the engine's KV cache, eager or as a replayed CUDA graph.

A prefill forward's shape is (rows, width): the engine pads the width to a multiple of `pad_tokens`, so a server
sees a few dozen shapes. On CUDA every (batch bucket, width) of at most `prefill_graph_tokens` tokens is captured
once at warm-up and replayed, the rows padded up to the bucket (`rows_for`): an eager forward of the 1.5B target is
a thousand kernel launches from Python, which cost about as much for one newcomer's prompt as for eight
(BENCHMARKS.md section 7), and competes for the interpreter with the daemon's other threads. Wider shapes, and every
shape on a CPU, run eagerly on their own rows.

The graphs share one memory pool, apart from the rounds' pool, and keep no tensor alive in it between replays:
each copies its hidden states into one output buffer of `prefill_graph_tokens` positions, valid until the next
prefill, which the engine reads before it prefills again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pipelines.kv_cache import PositionalKVCache, RowSubsetCache, decoder_forward
from pipelines.round_graphs import capture_graph

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    rows: torch.Tensor  # [n] the graph's static inputs, copied into before each replay
    tokens: torch.Tensor  # [n, width]
    positions: torch.Tensor  # [n, width]
    hidden: torch.Tensor  # [n, width, F] the graph's output


class PrefillRunner:
    def __init__(
        self,
        target: PreTrainedModel,
        cache: PositionalKVCache,
        use_graphs: bool,
        graph_tokens: int,
        feature_layers: tuple[int, ...] = (),
    ):
        # eager, never compiled: a compiled forward would recompile for every new width
        self.forward = decoder_forward(target, feature_layers=feature_layers)
        self.cache = cache
        self.hidden_size = target.config.hidden_size * (1 + len(feature_layers))  # F: what decoder_forward returns
        self.use_graphs = use_graphs and graph_tokens > 0
        self.graph_tokens = graph_tokens
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._row_counts: list[int] = []
        self._pool = None
        self._out: torch.Tensor | None = None  # [graph_tokens * F] every graph's hidden states, viewed per shape

    def __len__(self) -> int:
        return len(self._graphs)

    def rows_for(self, rows: int, width: int) -> int:
        """How many rows a prefill of `rows` rows at `width` runs with: the smallest captured row count that holds
        them at that width (the engine adds padding rows), else `rows` (eager: padding would be wasted work)."""
        return next((n for n in self._row_counts if n >= rows and (n, width) in self._graphs), rows)

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, width, F] of `tokens` at `positions` in cache rows `rows`, their keys and values written
        into the cache. A captured shape replays its graph (the result is valid until the next prefill)."""
        captured = self._graphs.get((tokens.shape[0], tokens.shape[1]))
        if captured is None:
            return self.forward(tokens, positions, RowSubsetCache(self.cache, rows))
        captured.rows.copy_(rows)
        captured.tokens.copy_(tokens)
        captured.positions.copy_(positions)
        captured.graph.replay()
        return captured.hidden

    def warm(self, row_counts: list[int], widths: list[int], park: int) -> None:
        """CUDA graphs: capture every (row count, width) of at most graph_tokens tokens, widest first so the pool
        is sized by the first capture. Eager: run one row once at every width (the kernels' per-shape set-up
        happens here, not while others wait). Writes go to row 0's positions from `park` on (clamped to the cache's
        end), where no prompt lives; call with no request in flight."""
        started = time.perf_counter()
        if self.use_graphs:
            shapes = [(n, w) for n in row_counts for w in widths if n * w <= self.graph_tokens]
            shapes.sort(key=lambda shape: -shape[0] * shape[1])
            self._row_counts = sorted(row_counts)
        else:
            shapes = [(1, w) for w in widths]
        device = self.cache.keys[0].device
        for n, width in shapes:
            rows = torch.zeros(n, dtype=torch.int64, device=device)
            positions = (park + torch.arange(width, device=device)).clamp_max(self.cache.max_seq_len - 1)
            positions = positions.expand(n, -1).contiguous()
            tokens = torch.zeros_like(positions)
            if self.use_graphs:
                self._graphs[(n, width)] = self._capture(rows, tokens, positions)
            else:
                self.forward(tokens, positions, RowSubsetCache(self.cache, rows))
        what = "captured %d prefill graphs" if self.use_graphs else "ran one-row prefills at %d widths"
        log.info(what + " in %.1f s", len(shapes), time.perf_counter() - started)

    def _capture(self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> _Captured:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            like = self.cache.keys[0]
            self._out = torch.empty(self.graph_tokens * self.hidden_size, dtype=like.dtype, device=like.device)
        n, width = tokens.shape
        out = self._out[: n * width * self.hidden_size].view(n, width, self.hidden_size)
        graph = capture_graph(
            lambda: out.copy_(self.forward(tokens, positions, RowSubsetCache(self.cache, rows))), self._pool
        )
        return _Captured(graph, rows, tokens, positions, out)
