"""Training losses for patched models, as reusable modules.

:class:`DistillationLoss` compares logits with the unpatched teacher's. The method losses read
what the model's last training-mode forward pass left behind (``PatchContext.aux``), so they
are called with the model after its forward::

    logits = model(images)
    loss = distill(logits, teacher_logits) + 2.0 * RatioLoss()(model)

:class:`FeatureDistillationLoss` compares the features the classifier reads (see
:func:`tokenpatch.train.head_features`).

A method loss the model's method does not produce inputs for raises a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TokenPatchError
from .patcher import context_of


class DistillationLoss(nn.Module):
    """KL divergence from the teacher's to the student's softened class distribution.

    ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch
    (Hinton et al., 2015), as in DeiT's and the token-reduction papers' soft distillation.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """(B, classes) logits of both -> scalar loss."""
        return self.per_sample(student_logits, teacher_logits).mean()

    def per_sample(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """(B, classes) logits of both -> (B,) loss of each sample."""
        t = self.temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                        reduction="none", log_target=True).sum(dim=-1) * t * t


class FeatureDistillationLoss(nn.Module):
    """Mean squared error between the student's and the teacher's pooled features.

    The features are what the classifier reads (the final class token after the last norm, or
    the pooled tokens), (B, C) each; :func:`tokenpatch.train.head_features` captures them. A
    denser signal than the logits' KL alone, in the spirit of DynamicViT's and EViT's token
    distillation, applied to the one token every method keeps.
    """

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """(B, C) features of both -> scalar loss."""
        return F.mse_loss(student_features, teacher_features)


def _aux(model: nn.Module, name: str, loss: str) -> list:
    ctx = context_of(model)
    values = ctx.aux.get(name)
    if not values:
        raise TokenPatchError(
            f"{loss} found no {name!r} inputs from the last forward pass of this {ctx.method.name!r} model; "
            f"it needs a training-mode pass (model.train()) of a method that produces them"
        )
    return values


class RatioLoss(nn.Module):
    """DynamicViT's ratio loss: kept fraction of each prune stage vs its target ``rho ** s``.

    Rao et al., NeurIPS 2021: the mean over stages and images of
    ``(kept_fraction - target) ** 2``, which stops the predictors from keeping everything.
    """

    def forward(self, model: nn.Module) -> Tensor:
        """Scalar loss from the model's last training-mode pass (``dynamicvit``)."""
        terms = [(fraction - target).pow(2).mean() for fraction, target in _aux(model, "keep_fraction", "RatioLoss")]
        return torch.stack(terms).mean()


class PolicyGradientLoss(nn.Module):
    """REINFORCE for ``iared2``'s interpreters (Williams, 1992; as IA-RED² trains its policy).

    Each image's reward is ``-task_loss - penalty * kept_fraction``, where ``kept_fraction`` is
    the share of the original patches its sampled decisions kept, averaged over the groups. The
    loss is ``-mean((reward - baseline) * log_prob)`` with ``log_prob`` the log-probability of
    all the image's sampled keep decisions and the batch's mean reward as the baseline (it
    lowers the variance without biasing the gradient). Only the interpreters get gradients
    from it: rewards are constants.

    Args:
        penalty: lambda, the reward given up per unit of kept fraction; 0 rewards accuracy only
            (the policy learns to keep tokens), large values reward dropping.
    """

    def __init__(self, penalty: float) -> None:
        super().__init__()
        self.penalty = penalty

    def forward(self, model: nn.Module, task_loss: Tensor) -> Tensor:
        """Scalar loss from the model's last training-mode pass (``iared2``) and its (B,) per-image task loss."""
        groups = _aux(model, "policy", "PolicyGradientLoss")
        log_prob = torch.stack([lp for lp, _ in groups]).sum(dim=0)
        kept = torch.stack([fraction for _, fraction in groups]).mean(dim=0)
        reward = -task_loss.detach() - self.penalty * kept
        return -((reward - reward.mean()) * log_prob).mean()


class TokenCutLoss(nn.Module):
    """IdleViT's token-cut loss: attention should not cross between selected and idle tokens.

    Xu et al., AJCAI 2023 (arXiv:2310.05654). At each reducing block the head-averaged
    attention of all tokens, ``W = softmax(mean_h(q k^T))``, is split by the block's selection
    into the selected set S and the idle set I, in the spirit of a normalised graph cut: the
    attention mass each token sends across the cut (to the other set, the class token
    excepted) is pushed to 0, and the mass a selected token keeps inside S is pushed to 1.
    Selected tokens then lose little by attending within S only, which is what idle inference
    does. Enable with ``FinetuneConfig(cut_weight=...)``; it asks the model to produce the
    all-token attention (an extra N x N map per reducing block, in training only).
    """

    def forward(self, model: nn.Module) -> Tensor:
        """Scalar loss from the model's last training-mode pass (``idle``)."""
        terms = []
        for logits, selected in _aux(model, "token_cut", "TokenCutLoss"):
            weights = logits.softmax(dim=-1)  # (B, N, N)
            rows, cols = selected.unsqueeze(2), selected.unsqueeze(1)
            crossing = (rows - cols).abs()
            crossing[:, :, 0] = 0.0  # every token may attend to the class token
            across = (weights * crossing).sum(-1)
            within_selected = (weights * rows * cols).sum(-1)
            terms.append(across.pow(2).mean() + (within_selected - selected).pow(2).mean())
        return torch.stack(terms).mean()
