"""Long fine-tuning runs: resumable training state, gradient accumulation, mixed precision."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tokenpatch
from tokenpatch.cli import main
from tokenpatch.errors import CheckpointError, InvalidOptionError
from tokenpatch.training import FinetuneConfig, finetune
from tokenpatch.training.sampling import EpochSampler, SeededItems

from conftest import images, make_model, random_folder_and_weights


@pytest.fixture
def folder(tmp_path):
    """12 random 40 px images and random DeiT-Tiny weights: (data dir, weights file)."""
    return random_folder_and_weights(tmp_path, 12)


def _tune(folder, out, *extra):
    data, weights = folder
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights), "--method",
            "dynamicvit", "--keep-ratio", "0.7", "--val-fraction", "0.25", "--batch-size", "3", "--augment",
            "--out", str(out), "--json", *extra]
    assert main(argv) == 0


def test_a_resumed_run_reaches_the_uninterrupted_runs_weights_bit_for_bit(folder, tmp_path, capsys):
    # 9 training images, 3 batches an epoch: the state at step 4 sits inside the second epoch; mixup, augmentation,
    # DynamicViT's Gumbel noise and its predictors all draw random numbers; the moving average and the learning
    # rate held per epoch ride along
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    long_run = ("--steps", "7", "--ema-decay", "0.5", "--lr-per-epoch")
    _tune(folder, whole, *long_run, "--save-every", "4", "-j", "0")
    state = Path(f"{whole}.state")
    saved = torch.load(state, weights_only=True)
    assert saved["position"] == {"step": 4, "epoch": 1, "batches": 1, "seconds": pytest.approx(saved["position"]["seconds"])}
    capsys.readouterr()
    _tune(folder, resumed, *long_run, "--resume", str(state), "-j", "2")  # other workers: the same images
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 7 and result["ema_out"] == str(tmp_path / "resumed.ema.safetensors")
    assert set(result["after_ema"]) == set(result["after"])
    for first, second in ((whole, resumed), (tmp_path / "whole.ema.safetensors", result["ema_out"])):
        final, again = load_file(str(first)), load_file(str(second))
        assert final.keys() == again.keys() and any(k.startswith("tokenpatch.") for k in final)
        assert all(torch.equal(final[k], again[k]) for k in final)
    final, average = load_file(str(whole)), load_file(str(tmp_path / "whole.ema.safetensors"))
    assert not all(torch.equal(final[k], average[k]) for k in final)  # the average lags the weights
    at_step_4 = saved["model"]
    assert not all(torch.equal(at_step_4[k], final[k]) for k in final)  # the resumed run did train


def test_a_state_is_refused_by_another_method_and_when_it_is_done(folder, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    _tune(folder, out, "--steps", "2", "--save-every", "2", "-j", "0")
    state = f"{out}.state"
    data, weights = folder
    for extra, message in ((["--method", "evit"], "written with method 'dynamicvit', this run has 'evit'"),
                           (["--steps", "2"], "already did 2 of its 2 steps"),
                           (["--ema-decay", "0.9"], "written without a moving average of the weights"),
                           ([], "no such file")):
        argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights),
                "--method", "dynamicvit", "--keep-ratio", "0.7", "--resume", state if extra else state + ".gone", *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["finetune", "deit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--save-every", "1"]) == 2
    assert "--save-every needs --out" in capsys.readouterr().err


def test_the_state_file_is_replaced_atomically_and_read_without_running_pickled_code(tmp_path):
    from tokenpatch.training.state import load_state

    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "tome", keep_ratio=0.7)
    state = tmp_path / "run.state"
    config = FinetuneConfig(steps=2, mixup=0.0, save_every=1, state_path=str(state))
    finetune(model, [images(model, batch=2)], config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.state"]  # no temporary files left behind
    evil = tmp_path / "evil.state"
    torch.save({"format": "tokenpatch-training-state", "hook": subprocess.Popen}, evil)
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_state(str(evil), model)


def test_the_moving_average_follows_every_step_and_is_scored_beside_the_model():
    from timm.utils import ModelEmaV3

    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "dynamicvit", keep_ratio=0.7)
    ema, decay = ModelEmaV3(model, decay=0.75), 0.75
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(scored):
        if scored is model:  # after each step: fold the new weights into the expected average
            for key, value in scored.state_dict().items():
                expected[key] = decay * expected[key] + (1 - decay) * value
        seen.append(scored)
        return {"norm": float(sum(p.detach().norm() for p in scored.parameters()))}

    history = finetune(model, [images(model, batch=4)], FinetuneConfig(steps=4, lr=1e-3, eval_every=1), progress=False,
                       evaluate=evaluate, ema=ema)
    assert seen == [model, ema.module] * 4
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value, expected[key], rtol=1e-5, atol=1e-7), key
    assert all(record["ema_norm"] != record["norm"] for record in history)
    assert history[-1]["ema_norm"] == pytest.approx(float(sum(p.detach().norm() for p in ema.module.parameters())))


def test_the_learning_rate_held_per_epoch_is_deits_loop_stepping_timms_cosine():
    from timm.scheduler import CosineLRScheduler

    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "tome", keep_ratio=0.7)
    epochs, steps_per_epoch, lr, min_lr = 4, 3, 1e-3, 1e-4
    config = FinetuneConfig(steps=epochs * steps_per_epoch, lr=lr, min_lr_ratio=min_lr / lr, warmup_steps=0,
                            lr_epoch_steps=steps_per_epoch, mixup=0.0)
    held = [record["lr"] for record in finetune(model, [images(model, batch=2)], config, progress=False)]
    # DeiT's main.py: train an epoch, then lr_scheduler.step(epoch) with the finished epoch's index
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr, warmup_t=0)
    official = []
    for epoch in range(epochs):
        official += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        scheduler.step(epoch)
    assert held == pytest.approx(official, rel=1e-12)
    assert len(set(held)) == epochs - 1  # epochs 0 and 1 share the first value
    with pytest.raises(InvalidOptionError, match="held per epoch needs a number of steps, not minutes"):
        finetune(model, [images(model, batch=2)], FinetuneConfig(minutes=1.0, lr_epoch_steps=3), progress=False)


@pytest.mark.parametrize("method, options", [("tome", {}), ("idle", {"cut_weight": 1.0})])
def test_two_accumulated_batches_of_16_step_like_one_batch_of_32(method, options):
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), method, keep_ratio=0.6, **options)
    twin = tokenpatch.patch(make_model("deit_tiny", depth=2), method, keep_ratio=0.6, **options)
    x = images(model, batch=32)
    lr = 1e-3
    common = dict(steps=2, lr=lr, warmup_steps=1, mixup=0.0)
    whole = finetune(model, [x], FinetuneConfig(**common), progress=False)
    halves = finetune(twin, [x[:16], x[16:]], FinetuneConfig(**common, accum_steps=2), progress=False)
    assert [r["loss"] for r in halves] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    # Adam divides by the root of tiny second moments, so float rounding moves a weight by up to ~1 % of lr
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, atol=0.02 * lr, rtol=0), name
    with pytest.raises(InvalidOptionError, match="accum_steps must be a positive integer"):
        finetune(model, [x], FinetuneConfig(steps=1, accum_steps=0), progress=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_runs_in_half_precision_and_stays_finite(amp):
    model = tokenpatch.patch(make_model("deit_tiny", depth=2), "evit", keep_ratio=0.6)
    seen = []
    model.blocks[1].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    history = finetune(model, [images(model, batch=4)], FinetuneConfig(steps=3, lr=1e-3, amp=amp), progress=False)
    assert seen and set(seen) == {{"bf16": torch.bfloat16, "fp16": torch.float16}[amp]}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


class Draws(torch.utils.data.Dataset):
    """``size`` items, each a fresh draw from torch's generator."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.rand(2)


def test_each_epoch_and_image_draws_its_own_augmentation_whoever_reads_it():
    data = SeededItems(Draws(6), seed=3)
    sampler = EpochSampler(data, seed=3)
    first = [key for key in sampler]
    assert sorted(index for _, index in first) == list(range(6)) and {epoch for epoch, _ in first} == {0}
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != [(1, index) for _, index in first]  # a new order each epoch
    sampler.skip_next(4)
    assert list(sampler) == second[4:] and list(sampler) == second  # skipped once, then whole passes again
    before = torch.get_rng_state()
    assert torch.equal(data[(1, 2)], data[(1, 2)]) and not torch.equal(data[(1, 2)], data[(0, 2)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched


def test_repeated_augmentation_reads_each_image_in_a_row_in_new_augmentations_over_the_processes():
    data = SeededItems(Draws(10), seed=3)
    alone = list(EpochSampler(data, seed=3, repeats=3))
    assert len(alone) == 10 and all(epoch == 0 for epoch, _, _ in alone)  # an epoch as long as without repeats
    # as DeiT's RASampler: the epoch's order, each index three times in a row
    assert [(index, copy) for _, index, copy in alone[:9]] == [(alone[3 * k][1], c) for k in range(3) for c in range(3)]
    assert len({data[key].sum().item() for key in alone[:3]}) == 3  # three augmentations of one image
    shards = []
    for rank in (0, 1):
        sampler = EpochSampler(data, seed=3, repeats=3)
        sampler.num_replicas, sampler.rank, sampler.num_samples = 2, rank, 5  # what two torchrun processes see
        shards.append(list(sampler))
    assert [len(shard) for shard in shards] == [5, 5]
    dealt = [key for pair in zip(*shards) for key in pair]  # round-robin: copies go to different processes
    assert [key[1:] for key in dealt] == [key[1:] for key in alone]
    assert shards[0][0][1] == shards[1][0][1] and shards[0][0][2] != shards[1][0][2]
    with pytest.raises(InvalidOptionError, match="aug_repeats must be a positive integer, got 0"):
        from tokenpatch.jobs.finetune import _loader

        _loader(data, 2, seed=0, aug_repeats=0)


def test_finetune_resumes_under_torchrun_with_autocast_and_only_rank_0_writes(folder, tmp_path):
    data, weights = folder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def tune(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).with_name("record_writes.py")), str(tmp_path / "writes"),
                   "finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights),
                   "--method", "evit", "--keep-ratio", "0.7", "--val-fraction", "0.25", "--batch-size", "2",
                   "--steps", "4", "--amp", "bf16", "--out", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    tune(whole, "--save-every", "3")
    state = torch.load(f"{whole}.state", weights_only=True)
    assert state["position"]["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    tune(resumed, "--resume", f"{whole}.state")
    writes = (tmp_path / "writes").read_text().split()
    assert sorted(writes) == ["0:resumed.safetensors", "0:whole.safetensors", "0:whole.safetensors.state"]
    final, again = load_file(str(whole)), load_file(str(resumed))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_a_resumed_time_budget_counts_the_time_spent_before():
    from tokenpatch.training.loop import Budget

    budget = Budget(steps=1, minutes=1.0, spent=30.0)
    assert budget.progress(0, 0) == pytest.approx(0.5) and budget.elapsed() >= 30.0
    assert not budget.done(1) and budget.spent_so_far() >= 30.0
