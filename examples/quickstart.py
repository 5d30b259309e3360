"""One-line patch of a timm ViT, then a look at what it bought.

    python examples/quickstart.py

Uses random weights (no download); pass a checkpoint to load_state_dict for real ones.
"""

import timm
import torch

import tokenpatch
from tokenpatch.measure.flops import count_macs

model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
images = torch.randn(2, 3, 224, 224)
reference = model(images)

tokenpatch.patch(model, method="idle", keep_ratio=0.5)  # in place, returns the same object
with tokenpatch.trace(model) as t:
    logits = model(images)  # later blocks compute on fewer tokens
print("tokens per block:", t.tokens_per_block)
print(f"GMACs at keep 0.5: {count_macs(model).gmacs:.2f}")

tokenpatch.set_keep_ratio(model, 0.7)  # change sparsity on the fly, no re-patch
print(f"GMACs at keep 0.7: {count_macs(model).gmacs:.2f}")

tokenpatch.set_keep_ratio(model, 1.0)  # keep everything: the unpatched outputs
print("max |diff| at keep 1.0:", (model(images) - reference).abs().max().item())

tokenpatch.unpatch(model)  # original forward back, bit for bit
print("unpatched again:", torch.equal(model(images), reference), f"GMACs {count_macs(model).gmacs:.2f}")
