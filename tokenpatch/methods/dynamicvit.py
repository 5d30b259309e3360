"""DynamicViT: a learned predictor decides which tokens to keep, hierarchically.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021 (arXiv:2106.02034). Before a few blocks (1/4, 2/4, 3/4 of the depth: 3, 6, 9 of
12) a small predictor scores the current patch tokens from their own features and a
policy-weighted mean of all kept tokens; stage ``s`` keeps ``keep_ratio ** s`` of the original
patches, and a dropped token stays dropped.

- Training mode: keep decisions are sampled with a straight-through Gumbel-softmax and
  multiplied into the previous stage's mask; nothing is removed, instead every later block's
  attention ignores masked keys (:func:`~tokenpatch.engine.policy_softmax`), so gradients reach
  the predictors. Each stage leaves its kept fraction for :class:`~tokenpatch.losses.RatioLoss`.
- Eval mode: the top-k tokens by predicted keep probability are gathered; later blocks run on
  the kept tokens only.

The predictors are new parameters: they live in the model as ``model.tokenpatch`` (keys
``tokenpatch.<stage>.*`` in ``state_dict``) and are saved and loaded with it. Untrained, they
rank tokens at random, so this method needs :func:`tokenpatch.train.finetune`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.base import BlockView
from ..engine import PassState, full_block, keep_tokens, masked_block
from ..errors import InvalidOptionError
from ..ops import top_k_positions
from .base import Method, MethodConfig, check_blocks, quarter_blocks


@dataclasses.dataclass
class DynamicViTConfig(MethodConfig):
    """Options of ``dynamicvit``.

    Attributes:
        keep_ratio: rho; stage s keeps ``rho ** s`` of the original patches.
        prune_blocks: blocks before which a predictor prunes; None means 1/4, 2/4, 3/4 of the
            depth ((3, 6, 9) for 12), filled in when the model is patched. Fixed at patch time
            (one predictor each).
        temperature: Gumbel-softmax temperature of the training-mode keep samples.
    """

    keep_ratio: float = 0.7
    prune_blocks: Optional[tuple[int, ...]] = None
    temperature: float = 1.0

    def validate(self, depth: int) -> None:
        super().validate(depth)
        blocks = quarter_blocks(depth) if self.prune_blocks is None else tuple(sorted(set(self.prune_blocks)))
        check_blocks("prune_blocks", blocks, depth)
        if not blocks or 0 in blocks:
            raise InvalidOptionError(f"prune_blocks must be non-empty and after block 0, got {list(blocks)}")
        self.prune_blocks = blocks
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise InvalidOptionError(f"temperature must be a positive number, got {self.temperature!r}")


class KeepPredictor(nn.Module):
    """Per-token keep/drop log-probabilities from local features and a kept-token summary.

    Tokens (B, M, C) go through LayerNorm, Linear, GELU; the first half of the channels stays
    per token, the second half is averaged over the tokens the policy keeps (the global
    context); both halves together go through a small MLP to 2 log-probabilities (keep, drop).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4), nn.GELU(), nn.Linear(width // 4, 2)
        )

    def forward(self, tokens: Tensor, policy: Tensor) -> Tensor:
        """(B, M, C) patch tokens and (B, M) keep mask -> (B, M, 2) log-probabilities [keep, drop]."""
        h = self.embed(tokens)
        local, context = h.chunk(2, dim=-1)
        weights = policy.unsqueeze(-1).to(h.dtype)
        context = (context * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1e-6)
        return self.head(torch.cat([local, context.expand_as(local)], dim=-1)).log_softmax(dim=-1)


class DynamicViT(Method):
    name = "dynamicvit"
    summary = "DynamicViT: learned predictors drop tokens before a few blocks (needs fine-tuning)"
    config_class = DynamicViTConfig
    structural_options = frozenset({"prune_blocks"})

    def schedule(self, config: MethodConfig, depth: int) -> list[Optional[float]]:
        assert isinstance(config, DynamicViTConfig) and config.prune_blocks is not None
        ratios: list[Optional[float]] = []
        for i in range(depth):
            stage = sum(b <= i for b in config.prune_blocks)  # blocks after a prune run masked in training
            ratios.append(config.keep_ratio**stage if stage else None)
        return ratios

    def build_modules(self, config: MethodConfig, depth: int, width: int) -> nn.Module:
        assert isinstance(config, DynamicViTConfig) and config.prune_blocks is not None
        return nn.ModuleList(KeepPredictor(width) for _ in config.prune_blocks)

    def reduce_block(
        self, view: BlockView, x: Tensor, state: PassState, block: int, ratio: float, config: MethodConfig
    ) -> Tensor:
        assert isinstance(config, DynamicViTConfig) and config.prune_blocks is not None and state.modules is not None
        predictor = state.modules[config.prune_blocks.index(block)] if block in config.prune_blocks else None
        if state.modules.training:
            return self._masked(view, x, state, block, ratio, predictor, config.temperature)
        if predictor is not None:
            x = self._prune(x, state, ratio, predictor)
        state.record(block, x.shape[1], x.shape[1])
        return full_block(view, x)

    @staticmethod
    def _prune(x: Tensor, state: PassState, ratio: float, predictor: nn.Module) -> Tensor:
        """Eval mode: keep the patches with the highest predicted keep log-probability."""
        p, patches = state.num_prefix, x.shape[1] - state.num_prefix
        keep = min(patches, max(1, int(state.initial_patches * ratio)))
        if keep == patches:
            return x
        log_probs = predictor(x[:, p:], x.new_ones(x.shape[0], patches))
        kept, index = keep_tokens(x, state, top_k_positions(log_probs[..., 0], keep))
        state.select(index)
        return kept

    @staticmethod
    def _masked(view: BlockView, x: Tensor, state: PassState, block: int, ratio: float,
                predictor: Optional[nn.Module], temperature: float) -> Tensor:
        """Training mode: sample keep decisions (at a prune block) and run the block with masked attention."""
        p = state.num_prefix
        if state.policy is None:
            state.policy = x.new_ones(x.shape[0], x.shape[1] - p)
        if predictor is not None:
            log_probs = predictor(x[:, p:], state.policy)
            keep = F.gumbel_softmax(log_probs, tau=temperature, hard=True)[..., 0]
            state.policy = keep * state.policy
            state.add_aux("keep_fraction", (state.policy.mean(dim=1), ratio))
        state.record(block, x.shape[1], x.shape[1])
        prefix = state.policy.new_ones(x.shape[0], p)
        return masked_block(view, x, torch.cat([prefix, state.policy], dim=1))
