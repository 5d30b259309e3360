"""The tokenpatch command line, end to end on a small model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tokenpatch
from tokenpatch.cli import main
from tokenpatch.backends.build import build_timm_model
from tokenpatch.core.registry import DEFAULT_METHOD
from tokenpatch.jobs.audit import AUDIT_COLUMNS, COMPILED_COLUMNS
from tokenpatch.jobs.models import DEFAULT_KEEP_RATIO, DEFAULT_MACS_RATIO
from tokenpatch.measure.flops import count_macs

from conftest import random_folder_and_weights

AUDIT = ["audit", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "64", "--batch-size", "2", "--repeats", "2"]


def test_audit_json_agrees_with_the_library(capsys):
    assert main(AUDIT + ["--keep-ratio", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema_version"] == 2 and {"model", "command", "batch_size"} <= set(out)
    row, = out["results"]  # one stable layout, for one method or all
    assert list(row) == ["method", "keep_ratio", "params", *AUDIT_COLUMNS[2:]]
    model = build_timm_model("deit_tiny_patch16_224", 64)
    assert row["gmacs_unpatched"] == count_macs(model, (1, 3, 64, 64)).total / 1e9
    assert row["method"] == DEFAULT_METHOD == "tome"
    tokenpatch.patch(model, DEFAULT_METHOD, keep_ratio=0.5)
    assert row["gmacs"] == count_macs(model, (1, 3, 64, 64)).total / 1e9
    assert row["macs_ratio"] == pytest.approx(row["gmacs"] / row["gmacs_unpatched"])
    assert row["ideal_speedup"] == pytest.approx(1 / row["macs_ratio"])
    assert row["img_s"] > 0 and row["img_s_unpatched"] > 0
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]


def test_audit_table_has_one_row_per_method(capsys):
    assert main(AUDIT + ["--methods", "all", "--keep-ratio", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["method", "keep_ratio", "gmacs_unpatched"]
    assert sorted(line.split()[0] for line in lines[3:]) == sorted(tokenpatch.available_methods())


def test_audit_notes_a_method_that_cannot_reach_the_budget_as_eval_does(capsys):
    """One of several methods out of reach is a row with a note (and a line under the table); alone, one error."""
    assert main(AUDIT + ["--methods", "tome", "ats", "--macs-ratio", "0.65", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["method"] == "tome" and rows[0]["macs_ratio"] == pytest.approx(0.65, rel=0.01)
    assert rows[1] == {"method": "ats", "note": rows[1]["note"]} and "ats can't reach macs_ratio=0.65" in rows[1]["note"]
    assert main(AUDIT + ["--method", "ats", "--macs-ratio", "0.65"]) == 2
    assert "ats can't reach macs_ratio=0.65" in capsys.readouterr().err


def test_audit_solves_each_method_for_a_mac_budget(capsys):
    assert main(["audit", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "128", "--batch-size", "2", "--repeats", "1",
                 "--methods", "all", "--macs-ratio", "0.7", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["method"] for r in rows) == sorted(tokenpatch.available_methods())
    for row in rows:
        assert row["macs_ratio"] == pytest.approx(0.7, rel=0.01)
        assert 0 < row["keep_ratio"] < 1


@pytest.fixture
def tuning_inputs(tmp_path):
    """A flat folder of 10 unlabelled images and random DeiT-Tiny weights: (data dir, weights file)."""
    return random_folder_and_weights(tmp_path, 10)


def test_finetune_runs_end_to_end_and_saves_a_loadable_model(tuning_inputs, tmp_path, capsys):
    data, weights = tuning_inputs
    out = tmp_path / "tuned.safetensors"
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights),
            "--steps", "2", "--batch-size", "4", "--keep-ratio", "0.5", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_images"] == 8 and result["val_images"] == 2 and result["world_size"] == 1
    assert set(result["before"]) == {"agreement"}  # no labels: agreement only
    assert result["macs"] < result["macs_unpatched"]
    restored = tokenpatch.load(build_timm_model("deit_tiny_patch16_224"), out)
    assert tokenpatch.get_config(restored).keep_ratio == 0.5


def test_finetune_trains_on_all_of_data_and_streams_a_separate_validation_folder(tuning_inputs, tmp_path, capsys):
    from PIL import Image

    data, weights = tuning_inputs
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (80 * i, 40, 0)).save(val / f"{i}.png")
    (val / "labels.csv").write_text("file,class_index\n0.png,1\n1.png,2\n2.png,999\n")
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--val-data", str(val), "--checkpoint",
            str(weights), "--steps", "2", "--batch-size", "4", "-j", "2", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["train_images"], result["val_images"]) == (10, 3)
    assert set(result["before"]) == set(result["after"]) == {"agreement", "top1"}  # the validation folder is labelled
    (val / "labels.csv").write_text("file,class_index\n0.png,1\n1.png,2\n2.png,1000\n")
    assert main(argv) == 2
    assert "class index 1000 is beyond the model's 1000 classes" in capsys.readouterr().err


def test_the_streamed_validation_scores_equal_the_in_memory_ones(tuning_inputs):
    import copy

    import torch
    from torch.utils.data import Subset

    from tokenpatch.data import eval_transform, image_dataset
    from tokenpatch.jobs.finetune import held_out
    from tokenpatch.measure.evaluate import predict

    data, weights = tuning_inputs
    model = tokenpatch.checkpoint.load_weights(build_timm_model("deit_tiny_patch16_224"), weights)
    dataset = image_dataset(data, transform=eval_transform(model))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    reference = predict(model, images).argmax(1)
    patched = tokenpatch.patch(copy.deepcopy(model), "evit", keep_ratio=0.3)
    for subset, workers in ((dataset, 0), (Subset(dataset, range(7)), 2)):
        val = held_out(patched, subset, workers=workers, batch_size=3)  # the reference: the patched model unpatched
        assert torch.equal(val.reference, reference[: len(subset)]) and val.labels is None
        expected = 100.0 * (predict(patched, images[: len(subset)]).argmax(1) == reference[: len(subset)]).double().mean()
        assert val.evaluate(patched) == {"agreement": pytest.approx(expected.item())}


def test_finetune_epochs_are_passes_over_the_training_images(tuning_inputs, capsys):
    data, weights = tuning_inputs
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights), "--epochs", "2",
            "--batch-size", "3", "-j", "0", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    # 8 images: 2 full batches of 3 a pass (the incomplete one is dropped, as the papers' loaders do)
    assert (result["train_images"], result["epochs"], result["steps"]) == (8, 2, 4)
    with pytest.raises(SystemExit) as exited:
        main(argv[:-1] + ["--steps", "2"])
    assert exited.value.code == 2 and "not allowed with argument --epochs" in capsys.readouterr().err


def test_finetune_evaluates_under_the_asked_precision_and_memory_format(tuning_inputs, capsys):
    data, weights = tuning_inputs
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights), "--steps", "1",
            "--batch-size", "4", "--keep-ratio", "0.5", "--device", "cpu", "--amp", "bf16", "--channels-last", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == f"checkpoint {weights}" and result["steps"] == 1
    assert set(result["after"]) == {"agreement"} and 0 <= result["after"]["agreement"] <= 100


def test_finetune_options_reach_the_job_and_explain_reads_its_checkpoint(tuning_inputs, tmp_path, capsys):
    data, weights = tuning_inputs
    out = tmp_path / "iared2.safetensors"
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights), "--steps", "2",
            "--batch-size", "4", "--method", "iared2", "--keep-ratio", "0.7", "--freeze-backbone", "--option", "kept_penalty=2",
            "--mixup", "1.0", "--feature-weight", "0.5", "--temperature", "2", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    config = result["finetune_config"]
    assert (config["train_backbone"], result["options"]["kept_penalty"], config["mixup"]) == (False, 2.0, 1.0)
    assert (config["feature_weight"], config["temperature"]) == (0.5, 2.0)
    image = next(data.glob("*.png"))
    maps = tmp_path / "maps"
    assert main(["explain", "deit_tiny_patch16_224", str(image), "--checkpoint", str(out), "--keep-ratio", "0.5",
                 "--out", str(maps), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "iared2" and shown["options"]["keep_ratio"] == 0.5
    assert (maps / "contact_sheet.png").is_file()
    assert main(["explain", "deit_tiny_patch16_224", str(image), "--checkpoint", str(out), "--method", "evit",
                 "--out", str(maps), "--json"]) == 0  # another method: the checkpoint's weights, patched with it
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "evit" and shown["options"]["keep_ratio"] == 0.5


def test_finetune_runs_unchanged_under_torchrun(tuning_inputs, tmp_path):
    data, weights = tuning_inputs
    out = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tokenpatch.cli", "finetune", "deit_tiny_patch16_224", "--data", str(data),
               "--checkpoint", str(weights), "--method", "dynamicvit", "--keep-ratio", "0.7",
               "--minutes", "0.03", "--batch-size", "2", "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # rank 0 alone prints
    assert result["world_size"] == 2 and result["train_images"] == 8
    assert result["steps"] >= 1 and result["loop"]["seconds"] >= 0.03 * 60  # both ranks stopped at the same step
    restored = tokenpatch.load(build_timm_model("deit_tiny_patch16_224"), out)
    assert tokenpatch.get_method_name(restored) == "dynamicvit"


def test_finetune_minutes_stops_in_time_then_evaluates_and_saves(tuning_inputs, tmp_path, capsys):
    data, weights = tuning_inputs
    out = tmp_path / "timed.safetensors"
    argv = ["finetune", "deit_tiny_patch16_224", "--data", str(data), "--checkpoint", str(weights),
            "--minutes", "0.05", "--batch-size", "4", "--out", str(out)]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    seconds, steps = result["loop"]["seconds"], result["steps"]
    assert result["finetune_config"]["minutes"] == 0.05 and set(result["after"]) == {"agreement"}
    # the 3 s budget, then stop at the first step boundary past it (a step's time is measured, not assumed)
    assert 3 <= seconds <= 3 + 2 * seconds / steps + 1
    assert tokenpatch.get_method_name(tokenpatch.load(build_timm_model("deit_tiny_patch16_224"), out)) == DEFAULT_METHOD
    assert main(argv) == 0
    assert re.search(r"images/s: data [\d.]+, teacher [\d.]+, student [\d.]+, loop [\d.]+", capsys.readouterr().out)
    for wrong, message in ((["--steps", "2"], "not allowed with argument --minutes"), (["--minutes", "0"], "expected a number in (0, inf)")):
        with pytest.raises(SystemExit) as exited:
            main(argv[:-2] + wrong)
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_finetune_example_runs_and_saves_a_loadable_model(tuning_inputs, tmp_path):
    data, weights = tuning_inputs
    out = tmp_path / "example.safetensors"
    example = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
    done = subprocess.run([sys.executable, str(example), "--data", str(data), "--checkpoint", str(weights),
                           "--steps", "2", "--batch-size", "4", "--method", "sait", "--keep-ratio", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saved sait@0.5" in done.stdout
    assert tokenpatch.get_method_name(tokenpatch.load(build_timm_model("deit_tiny_patch16_224"), out)) == "sait"


EVAL = ["eval", "deit_tiny_patch16_224"]


def test_eval_compares_methods_with_their_options_on_an_unlabelled_folder(tuning_inputs, capsys):
    data, weights = tuning_inputs
    argv = EVAL + ["--data", str(data), "--checkpoint", str(weights), "--keep-ratio", "0.5",
                   "--methods", "tome", "idle:score=fixed,ranking=softmax", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["images"], out["labelled"]) == (10, False)
    rows = out["results"]
    assert [r["method"] for r in rows] == ["unpatched", "tome", "idle:score=fixed,ranking=softmax"]
    assert rows[0]["agreement"] == 100.0 and rows[0]["macs_ratio"] == 1.0
    assert all(r["top1"] is None and r["keep_ratio"] in (None, 0.5) for r in rows)
    assert all(r["macs_ratio"] < 1 for r in rows[1:])


def test_eval_reports_accuracy_when_labelled_and_notes_a_budget_a_method_cannot_take(tuning_inputs, capsys):
    data, weights = tuning_inputs
    with open(data / "labels.csv", "w") as f:
        f.write("file,class_index\n" + "".join(f"{p.name},{i % 3}\n" for i, p in enumerate(sorted(data.glob("*.png")))))
    argv = EVAL + ["--data", str(data), "--checkpoint", str(weights), "--macs-ratio", "0.3", "--methods", "evit", "tome:r=2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "10 labelled images" in lines[0] and "30% of the MACs" in lines[0]
    assert lines[1].split() == ["method", "keep_ratio", "gmacs", "macs_ratio", "top1", "top5", "agreement"]
    assert [line.split()[0] for line in lines[3:5]] == ["unpatched", "evit"]
    assert lines[-1].startswith("tome:r=2: a MAC budget chooses tome's merges through keep_ratio")


def test_eval_compares_methods_at_the_default_macs_share_and_a_named_keep_ratio_at_one_keep_ratio(tuning_inputs, capsys):
    data, weights = tuning_inputs
    argv = EVAL + ["--data", str(data), "--checkpoint", str(weights), "--methods", "evit", "tome"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{DEFAULT_MACS_RATIO:.0%} of the MACs" in lines[0]
    shares = [float(line.split()[3]) for line in lines[4:6]]
    assert shares == pytest.approx([DEFAULT_MACS_RATIO] * 2, rel=0.011)
    assert main(argv + ["idle:keep_ratio=0.8"]) == 0  # a keep ratio named: the others at the default one
    lines = capsys.readouterr().out.splitlines()
    assert f"keep ratio {DEFAULT_KEEP_RATIO} unless a method names its own" in lines[0]
    keep_ratios = {line.split()[0]: float(line.split()[1]) for line in lines[4:7]}
    assert keep_ratios == {"evit": DEFAULT_KEEP_RATIO, "tome": DEFAULT_KEEP_RATIO, "idle:keep_ratio=0.8": 0.8}
    assert re.fullmatch(r"at one keep ratio the methods spend 0\.\d\d-0\.\d\d of the MACs; --macs-ratio R "
                        r"compares them at the same MACs", lines[-1])


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "tome:fuse=true"], "fuse"),
    (["--methods", "evit:fuse"], "KEY=VALUE pairs"),
    (["--macs-ratio", "0.5", "--keep-ratio", "0.5"], "not allowed with argument"),
])
def test_eval_refuses_bad_arguments_with_one_line(tuning_inputs, capsys, extra, message):
    data, _ = tuning_inputs
    with pytest.raises(SystemExit) as exit_info:
        main(EVAL + ["--data", str(data)] + extra)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def _compile_with(monkeypatch, backend):
    """torch.compile with another backend: the CLI's compile path, without inductor's minutes of C++ builds."""
    import torch

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real(model, backend=backend, **kwargs))


def test_audit_compile_reports_compiled_next_to_eager(monkeypatch, capsys):
    import torch

    torch._dynamo.reset()
    _compile_with(monkeypatch, "eager")
    assert main(AUDIT + ["--method", "evit", "--keep-ratio", "0.5", "--compile", "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)["results"]
    assert row["img_s"] > 0 and row["img_s_compiled"] > 0 and row["img_s_unpatched_compiled"] > 0
    assert row["speedup_compiled_low"] <= row["speedup_compiled"] <= row["speedup_compiled_high"]
    assert main(AUDIT + ["--method", "evit", "--keep-ratio", "0.5", "--compile"]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header[-6:] == ["speedup_high", *COMPILED_COLUMNS]


def test_audit_compile_failure_is_one_line(monkeypatch, capsys):
    import torch

    class Uncompilable(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("Compiler: cc not found\nlong inductor log")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Uncompilable())
    assert main(AUDIT + ["--method", "evit", "--compile"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert "torch.compile failed (RuntimeError: Compiler: cc not found)" in last


def test_methods_means_the_same_in_audit_and_eval(capsys, tmp_path):
    """Both take a list of METHOD[:KEY=VALUE,...] or all; all stands alone; a method named twice is refused."""
    assert main(AUDIT + ["--methods", "tome", "tome:r=2", "evit:keep_ratio=0.3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [("tome", 0.5), ("tome:r=2", 0.5),
                                                             ("evit:keep_ratio=0.3", 0.3)]
    assert rows[1]["gmacs"] < rows[0]["gmacs"]
    folder, _ = random_folder_and_weights(tmp_path, 2)
    evaluate = ["eval", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--data", str(folder), "--json"]
    assert main(evaluate + ["--methods", "all", "--keep-ratio", "0.5"]) == 0  # one keep ratio: no budget to fit
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["method"] for r in rows] == ["unpatched", *sorted(tokenpatch.available_methods())]
    for argv, words in [(AUDIT + ["--methods", "all", "tome"], "--methods all names every method: give it alone"),
                        (evaluate + ["--methods", "tome", "tome"], "--methods names tome twice"),
                        (AUDIT + ["--methods", "tome", "--method", "evit"], "give --method (with --option) for one")]:
        assert main(argv) == 2 and words in capsys.readouterr().err
