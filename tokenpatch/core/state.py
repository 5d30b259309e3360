"""The state one forward pass carries from block to block; it lives in the pass, never on the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .ops import read_grid, write_grid
from .records import BlockRecord, ScoreRecord, Trace

OwnT = TypeVar("OwnT")


@dataclass
class PassState(Generic[OwnT]):
    """What one forward pass carries from block to block.

    A pass starts when block 0 runs and owns everything it changes, so passes in different
    threads never share state. The options and schedule are a snapshot taken at the start: a
    configuration change made during the pass applies to the passes that start after it.

    Attributes:
        num_prefix: number of prefix tokens P (class token first).
        num_tokens: tokens N entering block 0.
        depth: blocks in the model.
        config: the method's options for this pass.
        plan: per block, the keep ratio the method applies (None: the block runs unchanged).
        positions: (B, N) original position of each current token; -1 for tokens that are not
            one patch (e.g. EViT's fused token).
        own: the method's own per-pass state (:meth:`~tokenpatch.core.method.Method.start_pass`).
        counts: (B,) real tokens per sample when samples keep different numbers of tokens and
            the batch is padded, or None. Shared by the padding pieces
            (:func:`~tokenpatch.core.pieces.padded_block`) and the trace.
        groups: (B, N - P at the start) for each original patch, the index among the current
            patches of the token that carries it, once a method merged tokens (only kept while
            a trace is open or a block returns the full grid); None before.
        trace: where to record per-block token counts, or None.
        modules: the method's own trained modules (e.g. DynamicViT's predictors), or None.
        collect: names of training signals the losses asked for (e.g. ``"attention"``).
        aux: what a training pass leaves for the losses, by name.
        grid_from: blocks with this index or higher return the full token grid (every original
            token, in order: what dense-output callers see); ``depth``: none does.
        last_states: (B, N, C) the state each original token had when it last left the
            sequence (kept only when some block returns the grid), or None.
        grid_tokens: the current tokens behind the grid the previous block returned, which the
            next block continues from; None when that block returned them as they are.
        class_token: True when the first prefix token is a class token.
    """

    num_prefix: int
    num_tokens: int
    depth: int
    config: Any
    plan: Sequence[Optional[float]]
    positions: Tensor
    own: OwnT = None  # type: ignore[assignment]
    counts: Optional[Tensor] = None
    groups: Optional[Tensor] = None
    trace: Optional[Trace] = None
    modules: Optional[nn.Module] = None
    collect: frozenset[str] = frozenset()
    aux: dict[str, list] = field(default_factory=dict)
    grid_from: int = 0
    last_states: Optional[Tensor] = None
    grid_tokens: Optional[Tensor] = None
    class_token: bool = True

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, depth: int, config: Any, plan: Sequence[Optional[float]], own: Any = None,
              trace: Optional[Trace] = None, modules: Optional[nn.Module] = None,
              collect: frozenset[str] = frozenset(), grid_from: Optional[int] = None,
              class_token: bool = True) -> "PassState":
        """State for a pass whose first block receives ``x`` of shape (B, N, C); ``grid_from``:
        the first block whose output is the full grid (None: the last block)."""
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)
        if trace is not None:
            trace.records.clear()
            trace.scores.clear()
            trace.input_tokens = n
        return cls(num_prefix=num_prefix, num_tokens=n, depth=depth, config=config, plan=plan, positions=positions,
                   own=own, trace=trace, modules=modules, collect=collect,
                   grid_from=depth - 1 if grid_from is None else grid_from, class_token=class_token)

    @property
    def initial_patches(self) -> int:
        """Patch tokens of the pass's first block (before any reduction)."""
        return self.num_tokens - self.num_prefix

    def add_aux(self, name: str, value: object) -> None:
        """Leave ``value`` under ``name`` for the training losses."""
        self.aux.setdefault(name, []).append(value)

    def record(self, block: int, attention_tokens: int, output_tokens: int, computed: Optional[Tensor] = None) -> None:
        """Log one block's work if a trace is open.

        Args:
            computed: (B, M) indices into the current tokens whose MLP ran; None means all.
        """
        if self.trace is not None:
            positions = self.positions if computed is None else self.positions.gather(1, computed)
            counts = None if self.counts is None else self.counts.detach()
            groups = None if self.groups is None else self.groups.detach()
            self.trace.records.append(BlockRecord(block, int(attention_tokens), int(positions.shape[1]), int(output_tokens),
                                                  positions.detach(), counts, groups))

    def record_scores(self, block: int, name: str, values: Tensor, real: Optional[Tensor] = None) -> None:
        """Log per-token scores of the current patch tokens if a trace is open.

        Args:
            values: (B, M) scores of the current patches (the tokens after the prefix).
            real: (B, M) bool, False for padding; None: all real.
        """
        if self.trace is not None:
            positions = self.positions[:, self.num_prefix:]
            if real is not None:
                positions = positions.masked_fill(~real, -1)
            self.trace.scores.append(ScoreRecord(block, name, positions.detach(), values.detach()))

    def real_tokens(self, n: int) -> Optional[Tensor]:
        """(B, n) bool, False for the padding of a padded batch of n tokens; None when unpadded."""
        return None if self.counts is None else torch.arange(n, device=self.counts.device) < self.counts.unsqueeze(1)

    def patch_counts(self, x: Tensor) -> Tensor:
        """(B,) real patches of each sample of the current (B, N, C) tokens ``x``, padding excluded."""
        if self.counts is None:
            return torch.full((x.shape[0],), x.shape[1] - self.num_prefix, device=x.device)
        return self.counts - self.num_prefix

    @property
    def keeps_grid(self) -> bool:
        """True when some block of this pass returns the full grid, so dropped tokens are remembered."""
        return self.grid_from < self.depth

    def select(self, index: Tensor, tokens: Tensor, counts: Optional[Tensor] = None, remember: bool = False) -> None:
        """Tokens were dropped: keep only those at (B, K) ``index`` of (B, N, C) ``tokens``.

        Updates the positions (and remembers the dropped tokens' last states when a block
        returns the full grid, or when ``remember`` asks for it: the method brings them back
        with :meth:`rejoin`).

        Args:
            counts: (B,) real tokens per sample among the kept ones when the batch is padded
                (becomes :attr:`counts`); None: unpadded. A batch of one image is padded to
                its own count, that is not at all, so it keeps None: its attention needs no
                key mask and keeps the fused kernels that refuse one (flash attention on CUDA).
        """
        if self.keeps_grid or remember:
            self.last_states = write_grid(self._known_grid(tokens), tokens, self.grid_positions(tokens.shape[1]))
        self.positions = torch.gather(self.positions, 1, index)
        self.counts = counts if index.shape[0] > 1 else None

    def grid_positions(self, n: int) -> Tensor:
        """(B, n) original positions of the current n tokens, -1 for padding and fused tokens."""
        real = self.real_tokens(n)
        return self.positions if real is None else self.positions.masked_fill(~real, -1)

    def to_grid(self, x: Tensor) -> Tensor:
        """The full (B, N, C) grid for current tokens ``x`` (B, M, C): each original token at its
        position, the current ones from ``x``, the dropped ones as they left."""
        if self.last_states is None and x.shape[1] == self.num_tokens:
            return x  # every token is still in the sequence, in order
        return write_grid(self._known_grid(x), x, self.grid_positions(x.shape[1]))

    def rejoin(self, x: Tensor) -> Tensor:
        """Every original token back in the sequence, in order: the (B, N, C) grid of the current
        (B, M, C) ``x`` and the tokens that left as they left (selected with ``remember``); the
        positions become ``0..N-1`` again."""
        grid = self.to_grid(x)
        self.positions = torch.arange(self.num_tokens, device=x.device).expand(x.shape[0], -1)
        self.last_states = None
        return grid

    def _known_grid(self, like: Tensor) -> Tensor:
        """The remembered (B, N, C) states, or zeros like (B, M, C) ``like`` before any token left."""
        if self.last_states is not None:
            return self.last_states
        return like.new_zeros(like.shape[0], self.num_tokens, like.shape[2])

    def from_grid(self, grid: Tensor) -> Tensor:
        """The current tokens again out of the (B, N, C) grid a block returned (a caller may have
        changed it between blocks); tokens outside the grid come from :attr:`grid_tokens`."""
        assert self.grid_tokens is not None
        tokens, self.grid_tokens = self.grid_tokens, None
        return read_grid(grid, self.grid_positions(tokens.shape[1]), tokens)
