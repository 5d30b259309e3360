"""The papers' fine-tuning recipes (``--recipe``) and the training pieces they need."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tokenpatch
from tokenpatch.backends.build import build_timm_model
from tokenpatch.cli import main
from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE, image_dataset, input_transform, preprocessing_of
from tokenpatch.errors import InvalidOptionError
from tokenpatch.jobs.finetune import finetune_job, resolved_config
from tokenpatch.core.runner import collecting, context_of
from tokenpatch.training import FinetuneConfig, finetune, frozen_teacher, training_loss
from tokenpatch.training.finetune import _parameter_groups
from tokenpatch.training.losses import DistillationLoss, FeatureDistillationLoss
from tokenpatch.training.recipes import RECIPES

from conftest import images, make_model


def test_a_recipe_fills_the_job_and_flags_override_it():
    job = finetune_job("idlevit", model="deit_small_patch16_224", data="train")
    assert (job.method, job.keep_ratio, job.epochs, job.batch_size, job.augment) == ("idle", 0.7, 30, 1024, "deit")
    assert job.options == {"cut_weight": 20.0, "idle_update": "unchanged"} and job.config.distill_weight == 10.0 and job.config.feature_normalize
    assert job.aug_repeats == 3 and finetune_job("dynamicvit", model="m", data="d").config.token_distill_weight == 0.5
    config = resolved_config(job)  # one process: 2 batches of 1024 a step reach the official 2048
    assert config.accum_steps == 2 and config.lr == pytest.approx(1e-5 * 2048 / 512)
    assert config.min_lr_ratio == pytest.approx(1e-6 / 4e-5)
    smaller = resolved_config(finetune_job("idlevit", model="m", data="d", batch_size=256))
    assert smaller.accum_steps == 8 and smaller.lr == pytest.approx(4e-5)  # the same total batch, the same lr
    mine = finetune_job("idlevit", model="m", data="d", lr=1e-4, accum_steps=1, steps=10,
                        options={"cut_weight": 5.0, "score": "fixed"})
    config = resolved_config(mine)
    assert (config.lr, config.accum_steps, config.steps, mine.epochs) == (1e-4, 1, 10, None)
    assert mine.options == {"cut_weight": 5.0, "score": "fixed", "idle_update": "unchanged"}
    assert (job.ema_decay, job.lr_per_epoch, mine.lr_per_epoch) == (0.99996, True, True)  # DeiT's loop, per epoch
    timed = finetune_job("idlevit", model="m", data="d", minutes=5.0)  # a time budget has no epochs to hold it through
    assert (timed.epochs, timed.lr_per_epoch, timed.config.minutes) == (None, False, 5.0)
    with pytest.raises(InvalidOptionError, match="--recipe idlevit trains idle"):
        finetune_job("idlevit", model="m", data="d", method="evit")
    with pytest.raises(InvalidOptionError, match="unknown recipe 'sait'"):
        finetune_job("sait", model="m", data="d")
    with pytest.raises(InvalidOptionError, match="unknown fine-tuning settings: warmup"):
        finetune_job(None, model="m", data="d", warmup=3)


def test_every_recipe_value_names_its_source():
    for recipe in RECIPES.values():
        job = finetune_job(recipe.name, model="m", data="d")
        assert job.recipe == recipe.name and recipe.code.startswith("https://github.com/")
        for name, setting in recipe.settings.items():
            assert setting.source.strip(), (recipe.name, name)


def test_timm_weight_decay_rule_and_frozen_tokens():
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "dynamicvit", keep_ratio=0.7)
    groups = _parameter_groups(model, FinetuneConfig(decay_every_weight=False, freeze_tokens=True))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.blocks[0].attn.qkv.bias) in exempt
    assert id(model.blocks[0].norm1.weight) in exempt and id(model.tokenpatch[0].head[0].bias) in exempt
    trained = decayed | exempt
    assert id(model.cls_token) not in trained and id(model.pos_embed) not in trained
    assert sorted(g["lr"] for g in groups) == sorted([5e-5, 5e-5, 1e-3, 1e-3])
    everything = _parameter_groups(model, FinetuneConfig())
    assert {g["weight_decay"] for g in everything} == {0.05} and id(model.pos_embed) in {
        id(p) for g in everything for p in g["params"]}


def test_normalised_feature_loss_and_stochastic_depth():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert FeatureDistillationLoss(normalize=True)(a, 3 * b).item() == pytest.approx(
        F.mse_loss(F.normalize(a), F.normalize(b)).item())
    model = build_timm_model("deit_tiny_patch16_224", img_size=64, drop_path=0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert type(build_timm_model("deit_tiny_patch16_224", img_size=64).blocks[-1].drop_path1).__name__ == "Identity"


def test_the_papers_augmentation_is_randaugment_with_random_erasing():
    model = make_model("deit_tiny")
    steps = [type(t).__name__ for t in input_transform(preprocessing_of(model), True, "deit").transforms]
    assert "RandAugment" in steps and "RandomErasing" in steps
    light = [type(t).__name__ for t in input_transform(preprocessing_of(model), True, "light").transforms]
    assert "RandAugment" not in light and "RandomErasing" not in light


def _recipe_objective(model, teacher, x, y, config):
    """The recipe's whole training loss (its method's losses included) on an unmixed batch, with
    the same random draws (Gumbel noise, stochastic depth) each time it is called."""
    ctx = context_of(model)
    with collecting(model, ctx.method.training_signals(ctx.config)), torch.no_grad():
        torch.manual_seed(0)
        loss = training_loss(model.train(), teacher, x, y, config, DistillationLoss(config.temperature))
    model.eval()
    return loss.item()


# DynamicViT's predictors start from scratch at 100x the backbone's learning rate: its loss first
# rises while they move (measured on 16 images: 4.2 -> 5.7 by step 3) and falls below the start after ~12 steps
@pytest.mark.parametrize("recipe, steps", [("dynamicvit", 20), ("evit", 6), ("idlevit", 6)])
def test_each_recipe_trains_the_real_deit_tiny_with_a_finite_falling_loss(recipe, steps, shared_data):
    values = RECIPES[recipe].values()
    official_lr = values["lr"] * values["total_batch"] / values.get("lr_batch", values["total_batch"])
    job = finetune_job(recipe, model="deit_tiny_patch16_224", data="-", batch_size=8, accum_steps=1,
                       lr=official_lr, steps=steps)
    config = resolved_config(job)
    model = build_timm_model("deit_tiny_patch16_224", drop_path=job.drop_path)
    model.load_state_dict(load_file(str(shared_data / DEIT_TINY_WEIGHTS)))
    tokenpatch.patch(model, job.method, keep_ratio=job.keep_ratio, **job.options)
    data = image_dataset(shared_data / IMAGENET_SAMPLE, transform=input_transform(preprocessing_of(model)))
    x, y = (torch.stack(column) if i == 0 else torch.tensor(column)
            for i, column in enumerate(zip(*(data[i] for i in range(8)))))
    teacher = frozen_teacher(model)
    before = _recipe_objective(model, teacher, x, y, config)
    history = finetune(model, [(x, y)], config, progress=False, teacher=teacher)
    after = _recipe_objective(model, teacher, x, y, config)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert after < before


def test_a_recipe_runs_from_the_command_line_and_reports_what_it_ran(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "n01440764"
    data.mkdir()
    for i in range(8):
        Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(data / f"{i}.png")
    argv = ["finetune", "deit_tiny_patch16_224", "--no-pretrained", "--data", str(tmp_path), "--recipe", "dynamicvit",
            "--steps", "2", "--batch-size", "2", "--accum-steps", "1", "--val-fraction", "0.25", "-j", "0", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    config = result["finetune_config"]
    assert (result["recipe"], result["method"], result["steps"], result["augment"]) == ("dynamicvit", "dynamicvit", 2, "deit")
    assert (config["module_lr"], config["distill_weight"], config["cutmix"], config["accum_steps"]) == (1e-3, 0.5, 1.0, 1)
    assert result["options"]["ratio_weight"] == 2.0
    assert set(result["after_ema"]) == set(result["after"])  # DynamicViT scores its moving average too
    assert main(argv[:-1] + ["--method", "evit"]) == 2
    assert "--recipe dynamicvit trains dynamicvit" in capsys.readouterr().err


def test_labels_only_training_on_unlabelled_images_is_refused(tmp_path, capsys):
    from PIL import Image

    for i in range(6):
        Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    argv = ["finetune", "deit_tiny_patch16_224", "--no-pretrained", "--data", str(tmp_path), "--recipe", "evit",
            "--steps", "1", "--batch-size", "2", "--accum-steps", "1", "-j", "0"]
    assert main(argv) == 2
    assert "nothing to learn from" in capsys.readouterr().err


def test_an_unlabelled_batch_in_labelled_training_is_distilled_only():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.7)
    x = images(model, batch=4)
    history = finetune(model, [(x, torch.full((4,), -1))], FinetuneConfig(steps=1, label_weight=1.0, cutmix=1.0),
                       progress=False)
    assert history[0]["loss"] > 0


def test_the_deit_augmentation_posterizes_to_zero_bits_without_failing():
    # RandAugment's top magnitude asks PosterizeIncreasing for 0 bits; Pillow 13 refuses them
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from tokenpatch.data import input_transform, preprocessing_of

    transform = input_transform(preprocessing_of(make_model("deit_tiny")), training=True, augmentation="deit")
    augment = next(step for step in transform.transforms if isinstance(step, RandAugment))
    posterize = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    assert posterize
    image = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    for op in posterize:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        assert op(image).getextrema() == ((0, 0),) * 3
