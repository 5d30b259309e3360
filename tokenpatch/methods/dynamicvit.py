"""DynamicViT: a learned predictor decides which tokens to keep, hierarchically.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021 (arXiv:2106.02034). Before a few blocks (1/4, 2/4, 3/4 of the depth: 3, 6, 9 of
12) a small predictor scores the current patch tokens from their own features and a
policy-weighted mean of all kept tokens; stage ``s`` keeps ``keep_ratio ** s`` of the original
patches, and a dropped token stays dropped.

- Training mode: keep decisions are sampled with a straight-through Gumbel-softmax and
  multiplied into the previous stage's mask; nothing is removed, instead every later block's
  attention ignores masked keys (:func:`~tokenpatch.core.pieces.policy_softmax`), so gradients reach
  the predictors. Each stage leaves its kept fraction for :class:`RatioLoss`.
- Eval mode: the top-k tokens by predicted keep probability are gathered; later blocks run on
  the kept tokens only.

The predictors are new parameters: they live in the model as ``model.tokenpatch`` (keys
``tokenpatch.<stage>.*`` in ``state_dict``) and are saved and loaded with it. Untrained, they
rank tokens at random, so this method needs :func:`tokenpatch.training.finetune`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.method import LossTerm, Method, MethodConfig, check_blocks, check_positive, quarter_blocks
from ..core.ops import top_k_positions
from ..core.pieces import full_block, keep_tokens, masked_block
from ..core.registry import register_method
from ..core.runner import last_training_outputs
from ..core.state import PassState
from ..errors import InvalidOptionError


#: a predictor weight of the official DynamicViT model: score_predictor.<stage>.(in_conv|out_conv).<rest>
OFFICIAL_PREDICTOR_KEY = re.compile(r"score_predictor\.(\d+)\.(in_conv|out_conv)\.(\d+\.(?:weight|bias))")


@dataclasses.dataclass
class DynamicViTConfig(MethodConfig):
    """Options of ``dynamicvit``.

    Attributes:
        keep_ratio: rho; stage s keeps ``rho ** s`` of the original patches.
        prune_blocks: blocks before which a predictor prunes; None means 1/4, 2/4, 3/4 of the
            depth ((3, 6, 9) for 12), filled in when the model is patched. Fixed at patch time
            (one predictor each).
        temperature: Gumbel-softmax temperature of the training-mode keep samples.
        ratio_weight: fine-tuning weight of the ratio loss (:class:`RatioLoss`; 0: off).
    """

    keep_ratio: float = 0.7
    prune_blocks: Optional[tuple[int, ...]] = None
    temperature: float = 1.0
    ratio_weight: float = 2.0

    def validate(self, depth: int) -> None:
        super().validate(depth)
        blocks = quarter_blocks(depth) if self.prune_blocks is None else tuple(sorted(set(self.prune_blocks)))
        check_blocks("prune_blocks", blocks, depth)
        if not blocks or 0 in blocks:
            raise InvalidOptionError(f"prune_blocks must be non-empty and after block 0, got {list(blocks)}")
        self.prune_blocks = blocks
        check_positive("temperature", self.temperature)
        check_positive("ratio_weight", self.ratio_weight, allow_zero=True)


@dataclasses.dataclass
class DynamicViTState:
    """Per pass, in training mode: (B, N - P) soft or hard keep mask over the original patches."""

    policy: Optional[Tensor] = None


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


@register_method
class DynamicViT(Method[DynamicViTConfig, DynamicViTState]):
    name = "dynamicvit"
    summary = "DynamicViT: learned predictors drop tokens before a few blocks (needs fine-tuning)"
    config_class = DynamicViTConfig
    needs_training = True
    masks_tokens_in_training = True
    structural_options = frozenset({"prune_blocks"})

    def start_pass(self, config: DynamicViTConfig) -> DynamicViTState:
        return DynamicViTState()

    def training_losses(self, config: DynamicViTConfig) -> list[tuple[float, LossTerm]]:
        return [(config.ratio_weight, lambda model, task_loss: RatioLoss()(model))] if config.ratio_weight > 0 else []

    def kept_token_mask(self, model: nn.Module) -> Tensor:
        # the official model hands its loss the final decision, detached (models/dyvit.py:466)
        return last_training_outputs(model, "kept_tokens", "token distillation")[-1]

    def official_module_keys(self, keys: Sequence[str]) -> dict[str, str]:
        # the official model (models/dyvit.py of raoyongming/DynamicViT) names the predictors
        # score_predictor.<stage>, their first part in_conv and the MLP after the pooling out_conv
        renamed = {}
        for key in keys:
            found = OFFICIAL_PREDICTOR_KEY.fullmatch(key)
            if found:
                stage, part, rest = found.groups()
                renamed[key] = f"{stage}.{'embed' if part == 'in_conv' else 'head'}.{rest}"
        return renamed

    def schedule(self, config: DynamicViTConfig, depth: int) -> list[Optional[float]]:
        assert config.prune_blocks is not None  # filled in by validate
        ratios: list[Optional[float]] = []
        for i in range(depth):
            stage = sum(b <= i for b in config.prune_blocks)  # blocks after a prune run masked in training
            ratios.append(config.keep_ratio**stage if stage else None)
        return ratios

    def build_modules(self, config: DynamicViTConfig, depth: int, width: int) -> nn.Module:
        assert config.prune_blocks is not None  # filled in by validate
        return nn.ModuleList(KeepPredictor(width) for _ in config.prune_blocks)

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[DynamicViTState], block: int, ratio: float,
                     config: DynamicViTConfig) -> Tensor:
        assert config.prune_blocks is not None and state.modules is not None
        predictor = state.modules[config.prune_blocks.index(block)] if block in config.prune_blocks else None
        if state.modules.training:
            return self._masked(view, x, state, block, ratio, predictor, config.temperature)
        if predictor is not None:
            x = self._prune(x, state, ratio, predictor)
        state.record(block, x.shape[1], x.shape[1])
        return full_block(view, x, state.positions)

    @staticmethod
    def _prune(x: Tensor, state: PassState, ratio: float, predictor: nn.Module) -> Tensor:
        """Eval mode: keep the patches with the highest predicted keep log-probability."""
        p, patches = state.num_prefix, x.shape[1] - state.num_prefix
        keep = min(patches, max(1, int(state.initial_patches * ratio)))
        if keep == patches:
            return x
        log_probs = predictor(x[:, p:], x.new_ones(x.shape[0], patches))
        kept, index = keep_tokens(x, state, top_k_positions(log_probs[..., 0], keep))
        state.select(index, x)
        return kept

    @staticmethod
    def _masked(view: BlockView, x: Tensor, state: PassState[DynamicViTState], block: int, ratio: float,
                predictor: Optional[nn.Module], temperature: float) -> Tensor:
        """Training mode: sample keep decisions (at a prune block) and run the block with masked attention."""
        p, own = state.num_prefix, state.own
        if own.policy is None:
            own.policy = x.new_ones(x.shape[0], x.shape[1] - p)
        if predictor is not None:
            log_probs = predictor(x[:, p:], own.policy)
            keep = F.gumbel_softmax(log_probs, tau=temperature, hard=True)[..., 0]
            own.policy = keep * own.policy
            state.add_aux("keep_fraction", (own.policy.mean(dim=1), ratio))
            state.add_aux("kept_tokens", own.policy.detach())  # the last stage's is the final mask
        state.record(block, x.shape[1], x.shape[1])
        prefix = own.policy.new_ones(x.shape[0], p)
        return masked_block(view, x, torch.cat([prefix, own.policy], dim=1), state.positions)


class RatioLoss(nn.Module):
    """DynamicViT's ratio loss: kept fraction of each prune stage vs its target ``rho ** s``.

    Rao et al., NeurIPS 2021: the mean over stages and images of
    ``(kept_fraction - target) ** 2``, which stops the predictors from keeping everything.
    Fine-tuning adds it with weight ``ratio_weight`` (an option of ``dynamicvit``).
    """

    def forward(self, model: nn.Module) -> Tensor:
        """Scalar loss from this thread's last training-mode pass of a ``dynamicvit`` model."""
        outputs = last_training_outputs(model, "keep_fraction", "RatioLoss")
        return torch.stack([(fraction - target).pow(2).mean() for fraction, target in outputs]).mean()
