"""The method-independent training losses: distillation of logits, of pooled features and of tokens.

:class:`DistillationLoss` compares logits with the unpatched teacher's;
:class:`FeatureDistillationLoss` compares the features the classifier reads (see
:func:`tokenpatch.training.head_features`); :class:`TokenDistillationLoss` the final tokens a
method kept (see :func:`tokenpatch.training.final_tokens`). A method's own losses live in its file and read
what this thread's last training-mode pass left behind, so they are called with the model
after its forward::

    from tokenpatch.methods.dynamicvit import RatioLoss

    logits = model(images)
    loss = distill(logits, teacher_logits) + 2.0 * RatioLoss()(model)

Those are ``RatioLoss`` (``tokenpatch.methods.dynamicvit``), ``TokenCutLoss``
(``tokenpatch.methods.idle``) and ``PolicyGradientLoss`` (``tokenpatch.methods.iared2``);
:func:`tokenpatch.training.finetune` adds them by itself, weighted by the method's options.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
    the pooled tokens), (B, C) each; :func:`tokenpatch.training.head_features` captures them. A
    denser signal than the logits' KL alone, in the spirit of DynamicViT's and EViT's token
    distillation, applied to the one token every method keeps. ``normalize`` compares the
    L2-normalised features instead, as IdleViT's feature distillation does (``losses.py`` of
    ``Ackesnal/IdleViT``).
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """(B, C) features of both -> scalar loss."""
        if self.normalize:
            student_features, teacher_features = F.normalize(student_features), F.normalize(teacher_features)
        return F.mse_loss(student_features, teacher_features)


class TokenDistillationLoss(nn.Module):
    """Mean squared error between the student's and the teacher's final patch tokens, over the
    tokens the student kept.

    DynamicViT's token distillation (Rao et al., NeurIPS 2021; ``losses.py:162-175`` of
    ``raoyongming/DynamicViT`` with ``mse_token=True``): the tokens are the final norm's outputs
    without the class token, a token counts where the training-mode keep mask exceeds 0.5, and the
    squared error is averaged over those tokens and the channels (0 when none is kept).
    """

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor, kept: Tensor) -> Tensor:
        """(B, N, C) tokens of both and the (B, N) keep mask -> scalar loss."""
        counted = kept > 0.5
        if not counted.any():
            return student_tokens.new_zeros(())
        return (student_tokens[counted] - teacher_tokens[counted]).pow(2).mean()
