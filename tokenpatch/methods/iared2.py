"""IA-RED²: a learned, interpretable policy drops redundant patches group by group.

Pan et al., "IA-RED²: Interpretability-Aware Redundancy Reduction for Vision Transformers",
NeurIPS 2021 (arXiv:2106.12620). The blocks are split into ``groups`` equal groups (4 groups of
3 blocks for 12); before each group a *multi-head interpreter* gives every remaining patch a
keep probability, and the patches it drops stay dropped for the rest of the network. The keep
probabilities are the explanation: a per-patch map of what the model needs
(:func:`tokenpatch.explain`).

- Training mode: keep decisions are sampled (Bernoulli per patch) and the dropped patches are
  really removed, so the pass costs what the decisions save. The decisions are not
  differentiable; :class:`PolicyGradientLoss` trains the interpreters with
  REINFORCE on the reward ``-loss - penalty * kept_fraction`` (see
  :func:`tokenpatch.training.finetune`, priced by the option ``kept_penalty``; with ``kept_target``
  the price is adjusted after every step so that the mean kept fraction approaches the target).
- Eval mode: deterministic: a patch is kept when its probability reaches ``threshold``, at most
  ``keep_ratio`` of the group's incoming patches (the most probable ones). ``expected_count``
  keeps instead the number the training decisions keep on average (the probabilities' sum), the
  most probable ones: a threshold of 0.5 keeps far more than training did when the probabilities
  sit near it.

Images keep different numbers of patches; a batch is padded to its largest count and the padding
masked out of every later block's attention (as in ``sait``), so a sample's output does not
depend on the rest of the batch. No official code exists; the interpreter's layout here (a
shared hidden layer, one score per head, averaged) is our reading of the paper's description.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.blocks import BlockView, ModelFacts
from ..core.distributed import in_process_group
from ..core.method import LossTerm, Method, MethodConfig, check_positive, require_class_token_pooling
from ..core.ops import gather_tokens, padded_top_positions, prefix_positions
from ..core.pieces import padded_block, refuse_export
from ..core.registry import register_method
from ..core.runner import context_of, last_training_outputs
from ..core.state import PassState
from ..errors import InvalidOptionError


#: how far one fine-tuning step moves the kept-fraction price per unit of mean kept fraction
#: above ``kept_target`` (``kept_target`` training)
PRICE_RATE = 0.1


@dataclasses.dataclass
class IARed2Config(MethodConfig):
    """Options of ``iared2``.

    Attributes:
        keep_ratio: at most this share of a group's incoming patches is kept at inference;
            1.0 turns reduction off (the dense model, exactly).
        groups: number of block groups, one interpreter before each; fixed at patch time.
        threshold: inference keeps a patch when its keep probability is at least this; None
            keeps exactly ``ceil(keep_ratio * patches)`` per group, the most probable ones.
        expected_count: inference keeps, per image and group, the number of patches its sampled
            training decisions keep on average (the sum of the keep probabilities, rounded), the
            most probable ones, at most ``keep_ratio``; replaces ``threshold``.
        heads: scores per patch that the interpreter averages; fixed at patch time.
        kept_penalty: fine-tuning's lambda of :class:`PolicyGradientLoss`: reward given up per
            unit of kept token fraction.
        kept_target: None keeps ``kept_penalty`` fixed; a share in (0, 1] makes fine-tuning adjust
            the price after every step (dual ascent, from ``kept_penalty``) so that the mean kept
            fraction of the sampled decisions approaches this share, each image still keeping its own.
    """

    keep_ratio: float = 0.7
    groups: int = 4
    threshold: Optional[float] = 0.5
    expected_count: bool = False
    heads: int = 4
    kept_penalty: float = 0.5
    kept_target: Optional[float] = None

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_positive("groups", self.groups)
        check_positive("heads", self.heads)
        if self.groups > depth:
            raise InvalidOptionError(f"groups must be at most the model's depth {depth}, got {self.groups}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise InvalidOptionError(f"threshold must be None or a number in (0, 1), got {self.threshold!r}")
        check_positive("kept_penalty", self.kept_penalty, allow_zero=True)
        if self.kept_target is not None and not 0 < self.kept_target <= 1:
            raise InvalidOptionError(f"kept_target must be None or a share in (0, 1], got {self.kept_target!r}")

    def group_starts(self, depth: int) -> list[int]:
        """The first block of each group: [0, 3, 6, 9] for 4 groups of a 12-block model."""
        return [depth * g // self.groups for g in range(self.groups)]


class Interpreters(nn.ModuleDict):
    """One :class:`Interpreter` per group, keyed by the group's first block, and the training state of
    the kept-fraction price: ``price_offset``, added to ``kept_penalty`` by ``kept_target`` training
    (a buffer that moves with the model and is not saved: it belongs to one fine-tuning run)."""

    def __init__(self, starts: list[int], width: int, heads: int) -> None:
        super().__init__({str(start): Interpreter(width, heads) for start in starts})
        self.register_buffer("price_offset", torch.zeros(()), persistent=False)


class Interpreter(nn.Module):
    """Multi-head interpreter: keep logits for patch tokens, read against the class token.

    Each patch's normed features, next to the class token's, pass through a shared hidden
    layer; ``heads`` linear scores of it are averaged into one logit. The bias starts high
    (keep probability ~0.9), so an untrained interpreter keeps almost everything.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())
        self.heads = nn.Linear(width, heads)
        nn.init.constant_(self.heads.bias, 2.0)

    def forward(self, patches: Tensor, context: Tensor) -> Tensor:
        """(B, M, C) patch tokens and (B, 1, C) context (the class token, or the mean patch) -> (B, M) keep logits."""
        patches, context = self.norm(patches), self.norm(context)
        h = self.hidden(torch.cat([patches, context.expand_as(patches)], dim=-1))
        return self.heads(h).mean(dim=-1)


@register_method
class IARed2(Method[IARed2Config, None]):
    name = "iared2"
    summary = "IA-RED²: interpreters drop patches before each block group (REINFORCE-trained, interpretable)"
    config_class = IARed2Config
    needs_training = True
    structural_options = frozenset({"groups", "heads"})
    variants = {"top_k": {"threshold": None}, "expected_count": {"expected_count": True}}

    def schedule(self, config: IARed2Config, depth: int) -> list[Optional[float]]:
        return [config.keep_ratio] * depth

    def build_modules(self, config: IARed2Config, depth: int, width: int) -> nn.Module:
        """One interpreter per group, keyed by the group's first block (``tokenpatch.3.*`` in state_dict)."""
        return Interpreters(config.group_starts(depth), width, config.heads)

    def check_compatible(self, config: IARed2Config, facts: ModelFacts) -> None:
        require_class_token_pooling("iared2 pads each batch to its largest per-image token count", facts.pools_class_token)

    def fixed_token_counts(self, config: IARed2Config) -> bool:
        return False

    def training_losses(self, config: IARed2Config) -> list[tuple[float, LossTerm]]:
        return [(1.0, PolicyGradientLoss(config.kept_penalty, config.kept_target))]

    def explanation_options(self, config: IARed2Config) -> Optional[dict[str, Any]]:
        # a cap of ceil(r * n) with r just below 1 keeps all n patches, and the interpreters still run
        return {"keep_ratio": math.nextafter(1.0, 0.0), "threshold": None, "expected_count": False}

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[None], block: int, ratio: float,
                     config: IARed2Config) -> Tensor:
        assert state.modules is not None
        if str(block) in state.modules:  # the first block of a group
            refuse_export(self.name)
            x = self._drop(x, state, block, ratio, config, state.modules[str(block)])
        state.record(block, x.shape[1], x.shape[1])
        return padded_block(view, x, state)

    @staticmethod
    def _drop(x: Tensor, state: PassState, block: int, ratio: float, config: IARed2Config,
              interpreter: nn.Module) -> Tensor:
        """Score the current patches, decide which stay, and gather them (padded per batch)."""
        p, patches = state.num_prefix, x.shape[1] - state.num_prefix
        real_counts = state.patch_counts(x)
        real = torch.arange(patches, device=x.device) < real_counts.unsqueeze(1)
        # the interpreters' global context: the class token, or the mean of the real patches without one
        context = x[:, :1] if state.class_token else (x[:, p:] * real.unsqueeze(-1)).sum(1, keepdim=True) / real_counts.view(
            -1, 1, 1).clamp_min(1)
        logits = interpreter(x[:, p:], context)
        probability = logits.sigmoid()
        state.record_scores(block, "keep_probability", probability, real)
        if interpreter.training:
            keep = torch.bernoulli(probability.detach()).bool() & real
            log_prob = -F.binary_cross_entropy_with_logits(logits, keep.to(logits.dtype), reduction="none")
            counts = keep.sum(dim=1).clamp(min=1)
            state.add_aux("policy", ((log_prob * real).sum(dim=1), counts / state.initial_patches))
        else:
            keep, counts = IARed2._inference_counts(probability, real, config)
            counts = counts.clamp(min=1).minimum(torch.ceil(ratio * real_counts.to(logits.dtype)).long())
        # decided patches first (most probable first), then the rest, padding last
        order = logits.detach() + 1e4 * keep - 2e4 * ~real
        positions = padded_top_positions(order, counts)
        index = torch.cat([prefix_positions(x.shape[0], p, x.device), positions + p], dim=1)
        state.select(index, x, counts + p)
        return gather_tokens(x, index)

    @staticmethod
    def _inference_counts(probability: Tensor, real: Tensor, config: IARed2Config) -> tuple[Tensor, Tensor]:
        """(B, M) patches decided kept and (B,) counts before the cap, from (B, M) keep probabilities."""
        if config.expected_count:  # the number the sampled training decisions keep on average
            return real, (probability * real).sum(dim=1).round().long()
        if config.threshold is None:
            return real, real.sum(dim=1)  # the cap decides
        keep = (probability >= config.threshold) & real
        return keep, keep.sum(dim=1)


class PolicyGradientLoss(nn.Module):
    """REINFORCE for ``iared2``'s interpreters (Williams, 1992; as IA-RED² trains its policy).

    Each image's reward is ``-task_loss - price * kept_fraction``, where ``kept_fraction`` is
    the share of the original patches its sampled decisions kept, averaged over the groups. The
    loss is ``-mean((reward - baseline) * log_prob)`` with ``log_prob`` the log-probability of
    all the image's sampled keep decisions and the batch's mean reward as the baseline (it
    lowers the variance without biasing the gradient). Only the interpreters get gradients
    from it: rewards are constants. Fine-tuning adds it with ``kept_penalty`` and ``kept_target``
    (options of ``iared2``).

    The price is ``penalty``; with a ``target`` it is ``max(0, penalty + offset)``, and each call
    then moves the model's ``price_offset`` by :data:`PRICE_RATE` times the batch's mean kept
    fraction minus the target (dual ascent on the constraint "mean kept fraction = target"; under
    ``torch.distributed`` the mean is over every process's batch, so all keep the same price).

    Args:
        penalty: lambda, the reward given up per unit of kept fraction; 0 rewards accuracy only
            (the policy learns to keep tokens), large values reward dropping.
        target: None, or the mean kept fraction the price is adjusted towards.
    """

    def __init__(self, penalty: float, target: Optional[float] = None) -> None:
        super().__init__()
        self.penalty = penalty
        self.target = target

    def forward(self, model: nn.Module, task_loss: Tensor) -> Tensor:
        """Scalar loss from this thread's last training-mode pass (``iared2``) and its (B,) per-image task loss."""
        groups = last_training_outputs(model, "policy", "PolicyGradientLoss")
        log_prob = torch.stack([lp for lp, _ in groups]).sum(dim=0)
        kept = torch.stack([fraction for _, fraction in groups]).mean(dim=0)
        reward = -task_loss.detach() - self._price(model, kept) * kept
        return -((reward - reward.mean()) * log_prob).mean()

    def _price(self, model: nn.Module, kept: Tensor) -> Tensor:
        """This step's price of a unit of kept fraction; with a target, also the dual-ascent step for the next."""
        if self.target is None:
            return torch.tensor(self.penalty, device=kept.device)
        offset = context_of(model).modules.price_offset
        price = (self.penalty + offset).clamp(min=0)
        # the offset stops at -penalty: a price below 0 would reward dropping nothing, and a longer
        # excursion below would take as many steps to undo
        offset.copy_((offset + PRICE_RATE * (_mean_over_processes(kept.detach()) - self.target)).clamp(min=-self.penalty))
        return price


def _mean_over_processes(values: Tensor) -> Tensor:
    """Mean of (B,) ``values`` over the batch and, under ``torch.distributed``, over every process's batch
    (so that all processes move the price alike and keep one price)."""
    if not in_process_group():
        return values.mean()
    total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    torch.distributed.all_reduce(total)
    return total[0] / total[1]
