"""What :func:`tokenpatch.trace` records: which tokens each block of a patched model computed on.

Example::

    with tokenpatch.trace(model) as t:
        model(images)
    print(t.tokens_per_block)      # e.g. [197, 197, 197, 99, 99, ...]
    t.records[5].positions         # (B, 99) original token positions the block's MLP ran on
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class BlockRecord:
    """What one block did in one forward pass.

    Attributes:
        block: index of the block in the model.
        attention_tokens: tokens that took part in the block's attention (queries and keys).
        mlp_tokens: tokens the block's MLP ran on.
        output_tokens: sequence length the block returned (idle tokens included).
        positions: (B, mlp_tokens) original positions of the tokens the MLP ran on; prefix
            tokens are ``0..P-1``, patches ``P..``, and a fused (EViT) token is ``-1``.
        counts: (B,) tokens each sample really kept when the method keeps a different number
            per image (``sait`` with ``mass``); the batch is then padded to ``mlp_tokens`` and
            ``positions[b, counts[b]:]`` are padding. None when every sample keeps ``mlp_tokens``.
        groups: (B, original patches) for a merging method (``tome``): the index, among the
            block's output patches, of the token each original patch was merged into; None when
            no tokens were merged. A merged token's ``positions`` entry is one of its members.
    """

    block: int
    attention_tokens: int
    mlp_tokens: int
    output_tokens: int
    positions: Tensor
    counts: Optional[Tensor] = None
    groups: Optional[Tensor] = None


@dataclass(frozen=True)
class ScoreRecord:
    """Per-token scores a method computed at a block (e.g. ``iared2``'s keep probabilities).

    Attributes:
        block: the block before which (or in which) the tokens were scored.
        name: what the values are, e.g. ``"keep_probability"``.
        positions: (B, M) original positions of the scored tokens (patches ``P..``); -1 for
            tokens that are not real patches (padding, fused tokens).
        values: (B, M) the scores.
    """

    block: int
    name: str
    positions: Tensor
    values: Tensor


@dataclass
class Trace:
    """Per-block records of the most recent forward pass made inside :func:`trace`.

    Attributes:
        input_tokens: tokens (prefix and patches) that entered the first block.
    """

    records: list[BlockRecord] = field(default_factory=list)
    scores: list[ScoreRecord] = field(default_factory=list)
    input_tokens: int = 0

    @property
    def tokens_per_block(self) -> list[int]:
        """Number of tokens each block's MLP computed on, in block order."""
        return [r.mlp_tokens for r in self.records]

    @property
    def attention_tokens_per_block(self) -> list[int]:
        """Number of tokens each block's attention computed on, in block order."""
        return [r.attention_tokens for r in self.records]
