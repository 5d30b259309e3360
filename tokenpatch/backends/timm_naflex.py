"""Backend for timm's ``NaFlexVit`` (NaFlex ViTs, RADIO, SigLIP 2 towers) on plain image tensors.

Read against timm 1.0.31 ``timm.models.naflexvit``: the blocks are timm's ``Block`` with the
standard ``Attention`` (as in ``VisionTransformer``); a plain (B, C, H, W) image gives them no
mask and no rotary table. NaFlex's own patch dictionaries (``patches``, ``patch_coord``,
``patch_valid``) pad variable-size images and mask the padding in every block, which the patch
refuses with the attention-mask error, as for any timm block.
"""

from __future__ import annotations

from torch import nn

from .timm import TimmBackend

try:
    from timm.models.naflexvit import NaFlexVit
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("tokenpatch's timm backend needs timm>=1.0.20 (pip install timm)") from exc


class NaFlexBackend(TimmBackend):
    """timm ``NaFlexVit`` models built from timm's ``Block``/``Attention``, called on image tensors."""

    name = "timm-naflex"
    supported = "timm NaFlexVit models (naflexvit_*) with timm Block/Attention blocks, called on (B, C, H, W) images"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, NaFlexVit)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model.embeds, "cls_token", None) is not None  # NaFlex keeps its prefix in the embedder

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        # NaFlex takes any size; its pretrained configuration names the one it was evaluated at
        return tuple(model.pretrained_cfg["input_size"][1:])
