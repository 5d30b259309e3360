"""Short fine-tuning of a patched model: the self-distillation loop, its losses, the CLI job."""

from .finetune import FinetuneConfig, finetune, frozen_teacher, head_features, training_loss, unpatched_behaviour
from .losses import DistillationLoss, FeatureDistillationLoss

__all__ = ["FinetuneConfig", "finetune", "frozen_teacher", "head_features", "training_loss", "unpatched_behaviour",
           "DistillationLoss", "FeatureDistillationLoss"]
