"""Test utilities: timm models' weights in transformers' key layouts (ViT/DeiT, DINOv2, CLIP, SigLIP)."""

from __future__ import annotations

import torch
import transformers

from tokenpatch.errors import TokenPatchError


def hf_config_from_timm(timm_model: torch.nn.Module):
    """The transformers ``ViTConfig`` (one prefix token) or ``DeiTConfig`` (two) of a timm ViT/DeiT."""
    prefix = timm_model.num_prefix_tokens
    if prefix not in (1, 2) or getattr(timm_model, "reg_token", None) is not None:
        raise TokenPatchError(f"no transformers ViT/DeiT layout has {prefix} prefix tokens")
    config_class = transformers.DeiTConfig if prefix == 2 else transformers.ViTConfig
    block = timm_model.blocks[0]
    return config_class(
        hidden_size=timm_model.embed_dim,
        num_hidden_layers=len(timm_model.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        image_size=timm_model.patch_embed.img_size[0],
        patch_size=timm_model.patch_embed.patch_size[0],
        num_labels=timm_model.num_classes,
        layer_norm_eps=block.norm1.eps,
        hidden_act="gelu",
        qkv_bias=block.attn.qkv.bias is not None,
    )


def timm_to_hf(state: dict[str, torch.Tensor], distilled: bool) -> dict[str, torch.Tensor]:
    """Rename (and split qkv of) a timm ViT/DeiT state dict for ViT/DeiTForImageClassification(WithTeacher)."""
    base = "deit" if distilled else "vit"
    out = {
        f"{base}.embeddings.cls_token": state["cls_token"],
        f"{base}.embeddings.position_embeddings": state["pos_embed"],
        f"{base}.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{base}.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{base}.layernorm.weight": state["norm.weight"],
        f"{base}.layernorm.bias": state["norm.bias"],
    }
    if distilled:
        out[f"{base}.embeddings.distillation_token"] = state["dist_token"]
        heads = {"head": "cls_classifier", "head_dist": "distillation_classifier"}
    else:
        heads = {"head": "classifier"}
    for timm_head, hf_head in heads.items():
        out[f"{hf_head}.weight"], out[f"{hf_head}.bias"] = state[f"{timm_head}.weight"], state[f"{timm_head}.bias"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        src, dst = f"blocks.{i}", f"{base}.layers.{i}"
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = state[f"{src}.{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}.attn.qkv.{kind}"].chunk(3, dim=0)
            out.update({f"{dst}.attention.q_proj.{kind}": q, f"{dst}.attention.k_proj.{kind}": k,
                        f"{dst}.attention.v_proj.{kind}": v})
    return out


def hf_twin(timm_model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model with exactly the timm model's weights, in eval mode."""
    distilled = timm_model.num_prefix_tokens == 2
    config = hf_config_from_timm(timm_model)
    model_class = (transformers.DeiTForImageClassificationWithTeacher if distilled
                   else transformers.ViTForImageClassification)
    model = model_class(config)
    model.load_state_dict(timm_to_hf(timm_model.state_dict(), distilled), strict=True)
    return model.eval()


def compare_patched(timm_model: torch.nn.Module, hf_model: torch.nn.Module, x: torch.Tensor, method: str,
                    ratio: float, options: dict | None = None) -> tuple[bool, float]:
    """Patch both models alike (and unpatch them after): (same tokens in every block, max |logit diff|)."""
    import tokenpatch

    for model in (timm_model, hf_model):
        tokenpatch.patch(model, method, keep_ratio=ratio, **(options or {}))
    try:
        with torch.no_grad(), tokenpatch.trace(timm_model) as timm_trace:
            timm_logits = timm_model(x)
        with torch.no_grad(), tokenpatch.trace(hf_model) as hf_trace:
            hf_logits = hf_model(x).logits
    finally:
        tokenpatch.unpatch(timm_model)
        tokenpatch.unpatch(hf_model)
    same = len(timm_trace.records) == len(hf_trace.records) and all(
        torch.equal(a.positions, b.positions) for a, b in zip(timm_trace.records, hf_trace.records))
    return same, (timm_logits - hf_logits).abs().max().item()


def _split_qkv(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], src: str, dst: str) -> None:
    """timm's fused ``{src}.qkv`` as transformers' ``{dst}.q_proj/k_proj/v_proj``."""
    for kind in ("weight", "bias"):
        for name, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}.qkv.{kind}"].chunk(3, dim=0)):
            out[f"{dst}.{name}.{kind}"] = part


def dinov2_twin(timm_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` with exactly a timm DINOv2's weights.

    The timm model must be a ``vit_*_dinov2`` (class token, optional registers, layer scale) built
    without a head; its position embedding may leave out the class token (``no_embed_class``),
    which transformers then gets as a zero row.
    """
    state = timm_model.state_dict()
    registers = timm_model.reg_token.shape[1] if timm_model.reg_token is not None else 0
    width, heads = timm_model.embed_dim, timm_model.blocks[0].attn.num_heads
    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    config = config_class(hidden_size=width, num_hidden_layers=len(timm_model.blocks), num_attention_heads=heads,
                          intermediate_size=timm_model.blocks[0].mlp.fc1.out_features,
                          image_size=timm_model.patch_embed.img_size[0], patch_size=timm_model.patch_embed.patch_size[0],
                          layer_norm_eps=timm_model.norm.eps, **({"num_register_tokens": registers} if registers else {}))
    positions = state["pos_embed"]
    if positions.shape[1] == timm_model.patch_embed.num_patches:  # no_embed_class: the class token has none
        positions = torch.cat([positions.new_zeros(1, 1, width), positions], dim=1)
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": positions,
           "embeddings.mask_token": torch.zeros(1, width),
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    if registers:
        out["embeddings.register_tokens"] = state["reg_token"]
    renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2"}
    for i in range(len(timm_model.blocks)):
        src, dst = f"blocks.{i}", f"encoder.layer.{i}"
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = state[f"{src}.{old}.{kind}"]
        _split_qkv(out, state, f"{src}.attn", f"{dst}.attention")
        out[f"{dst}.layer_scale1.lambda1"] = state[f"{src}.ls1.gamma"]
        out[f"{dst}.layer_scale2.lambda1"] = state[f"{src}.ls2.gamma"]
    model = (transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model)(config)
    model.load_state_dict(out, strict=True)
    return model.eval()


def _clip_layers(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], depth: int) -> None:
    """timm blocks as CLIP/SigLIP encoder layers (``encoder.layers.i``), into ``out``."""
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        src, dst = f"blocks.{i}", f"encoder.layers.{i}"
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = state[f"{src}.{old}.{kind}"]
        _split_qkv(out, state, f"{src}.attn", f"{dst}.self_attn")


def _encoder_config(config_class: type, timm_model: torch.nn.Module) -> object:
    """A transformers vision config with a timm ViT's sizes, exact GELU and its norm epsilon."""
    return config_class(
        hidden_size=timm_model.embed_dim, num_hidden_layers=len(timm_model.blocks),
        num_attention_heads=timm_model.blocks[0].attn.num_heads, intermediate_size=timm_model.blocks[0].mlp.fc1.out_features,
        image_size=timm_model.patch_embed.img_size[0], patch_size=timm_model.patch_embed.patch_size[0], hidden_act="gelu",
        layer_norm_eps=timm_model.norm.eps)


def siglip_twin(timm_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``SiglipVisionModel`` with exactly a timm SigLIP image tower's weights.

    The timm model must be a ``vit_*_siglip_*`` (no class token, exact GELU, attention-pool head)
    built without a classifier; its ``attn_pool`` becomes transformers' pooling ``head``.
    """
    state = timm_model.state_dict()
    out = {"embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
           "embeddings.position_embedding.weight": state["pos_embed"][0],
           "post_layernorm.weight": state["norm.weight"], "post_layernorm.bias": state["norm.bias"]}
    _clip_layers(out, state, len(timm_model.blocks))
    pool = "attn_pool"
    out.update({"head.probe": state[f"{pool}.latent"],
                "head.attention.in_proj_weight": torch.cat([state[f"{pool}.q.weight"], state[f"{pool}.kv.weight"]]),
                "head.attention.in_proj_bias": torch.cat([state[f"{pool}.q.bias"], state[f"{pool}.kv.bias"]]),
                "head.attention.out_proj.weight": state[f"{pool}.proj.weight"],
                "head.attention.out_proj.bias": state[f"{pool}.proj.bias"],
                "head.layernorm.weight": state[f"{pool}.norm.weight"], "head.layernorm.bias": state[f"{pool}.norm.bias"]})
    for layer in ("fc1", "fc2"):
        for kind in ("weight", "bias"):
            out[f"head.mlp.{layer}.{kind}"] = state[f"{pool}.mlp.{layer}.{kind}"]
    model = transformers.SiglipVisionModel(_encoder_config(transformers.SiglipVisionConfig, timm_model))
    model.load_state_dict(out, strict=True)
    return model.eval()


def clip_twin(timm_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``CLIPVisionModel`` with exactly a timm CLIP image tower's weights.

    The timm model must be a ``vit_*_clip_*`` built without a head (class token, ``norm_pre``,
    exact GELU); transformers' ``post_layernorm`` gets timm's final ``norm`` (transformers
    applies it to the pooled class token only).
    """
    state = timm_model.state_dict()
    config = _encoder_config(transformers.CLIPVisionConfig, timm_model)
    out = {"embeddings.class_embedding": state["cls_token"].flatten(),
           "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
           "embeddings.position_embedding.weight": state["pos_embed"][0],
           "pre_layrnorm.weight": state["norm_pre.weight"], "pre_layrnorm.bias": state["norm_pre.bias"],
           "post_layernorm.weight": state["norm.weight"], "post_layernorm.bias": state["norm.bias"]}
    _clip_layers(out, state, len(timm_model.blocks))
    model = transformers.CLIPVisionModel(config)
    model.load_state_dict(out, strict=True)
    return model.eval()


def beit_twin(timm_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``BeitModel`` with exactly a timm BEiT's weights (per-block relative
    position bias, layer scale, mean pooling); the fc norm becomes the pooler's norm."""
    state = timm_model.state_dict()
    width = timm_model.embed_dim
    config = transformers.BeitConfig(
        hidden_size=width, num_hidden_layers=len(timm_model.blocks), num_attention_heads=timm_model.blocks[0].attn.num_heads,
        intermediate_size=timm_model.blocks[0].mlp.fc1.out_features, image_size=timm_model.patch_embed.img_size[0],
        patch_size=timm_model.patch_embed.patch_size[0], use_relative_position_bias=True, use_mean_pooling=True,
        layer_scale_init_value=0.1, layer_norm_eps=timm_model.fc_norm.eps)
    out = {"embeddings.cls_token": state["cls_token"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "pooler.layernorm.weight": state["fc_norm.weight"], "pooler.layernorm.bias": state["fc_norm.bias"]}
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(len(timm_model.blocks)):
        src, dst = f"blocks.{i}", f"layers.{i}"
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{new}.{kind}"] = state[f"{src}.{old}.{kind}"]
        q, k, v = state[f"{src}.attn.qkv.weight"].chunk(3, dim=0)
        out.update({f"{dst}.attention.q_proj.weight": q, f"{dst}.attention.k_proj.weight": k,
                    f"{dst}.attention.v_proj.weight": v, f"{dst}.attention.q_proj.bias": state[f"{src}.attn.q_bias"],
                    f"{dst}.attention.v_proj.bias": state[f"{src}.attn.v_bias"],
                    f"{dst}.lambda_1": state[f"{src}.gamma_1"], f"{dst}.lambda_2": state[f"{src}.gamma_2"],
                    f"{dst}.relative_position_bias.relative_position_bias_table":
                        state[f"{src}.attn.relative_position_bias_table"]})
    model = transformers.BeitModel(config)
    model.load_state_dict(out, strict=True)
    return model.eval()
