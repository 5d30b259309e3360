"""``tokenpatch eval`` at any size: labels in the model's label space, streamed batches, several
processes, device and precision flags, results files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokenpatch.cli import main
from tokenpatch.data import IMAGENET_SAMPLE, DEIT_TINY_WEIGHTS, image_dataset
from tokenpatch.errors import DataError, TokenPatchError
from tokenpatch.jobs.evaluation import MethodSpec, evaluation_rows, in_batches
from tokenpatch.measure.evaluate import accuracy, predict
from tokenpatch.measure.runtime import Runtime

from conftest import images, make_model

# the first, second and last ImageNet-1k WordNet ids
TENCH, GOLDFISH, TOILET_TISSUE = "n01440764", "n01443537", "n15075141"


def _image_folder(root: Path, layout: dict[str, int]) -> Path:
    """``layout``: sub-folder ("" for the root) -> number of small random images in it."""
    g = torch.Generator().manual_seed(len(layout))
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = (torch.rand(40, 36, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
    return root


def _labels(dataset) -> list[int]:
    return [label for _, label in dataset.samples] if hasattr(dataset, "samples") else [dataset[i][1] for i in range(len(dataset))]


def test_wordnet_id_folders_take_the_imagenet_indices_of_a_1000_class_model(tmp_path):
    root = _image_folder(tmp_path, {TOILET_TISSUE: 1, GOLDFISH: 2, TENCH: 1})
    assert _labels(image_dataset(root, num_classes=1000)) == [0, 1, 1, 999]
    assert _labels(image_dataset(root)) == [0, 1, 1, 2]  # without a label space: torchvision's sorted folder order
    with pytest.raises(DataError, match="model has 10 classes, no ImageNet variant's; give --class-map"):
        image_dataset(root, num_classes=10)


def test_a_class_map_names_other_folders_in_the_model_label_order(tmp_path):
    root = _image_folder(tmp_path / "data", {"cat": 2, "dog": 1})
    mapping = tmp_path / "classes.txt"
    mapping.write_text("bird\ndog\ncat\n")
    assert _labels(image_dataset(root, num_classes=10, class_map=mapping)) == [2, 2, 1]
    with pytest.raises(DataError, match="class index 2 is beyond the model's 2 classes"):
        image_dataset(root, num_classes=2, class_map=mapping)
    mapping.write_text("bird\ndog\n")
    with pytest.raises(DataError, match=r"1 class folder\(s\) not in the class map .*'cat'"):
        image_dataset(root, num_classes=10, class_map=mapping)
    with pytest.raises(DataError, match="'cat' is not an ImageNet WordNet id"):
        image_dataset(root, num_classes=1000)
    with pytest.raises(DataError, match="a class map is a .txt file"):
        image_dataset(root, num_classes=10, class_map=tmp_path / "classes.json")
    flat = _image_folder(tmp_path / "flat", {"": 2})
    with pytest.raises(DataError, match="no class sub-folders"):
        image_dataset(flat, num_classes=10, class_map=mapping)


def test_labels_csv_indices_must_be_in_the_label_space(tmp_path):
    root = _image_folder(tmp_path, {"": 2})
    (root / "labels.csv").write_text("file,class_index\n0.png,3\n1.png,12\n")
    assert _labels(image_dataset(root, num_classes=20)) == [3, 12]
    with pytest.raises(DataError, match="labels.csv: class index 12 is beyond the model's 10 classes"):
        image_dataset(root, num_classes=10)


EVAL = ["eval", "deit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "-j", "0"]


def test_the_cli_maps_class_folders_and_refuses_names_it_cannot_map_in_one_line(tmp_path, capsys):
    root = _image_folder(tmp_path / "synsets", {TENCH: 2, TOILET_TISSUE: 1})
    assert main(EVAL + ["--data", str(root), "--methods", "evit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labelled"] and out["images"] == 3
    odd = _image_folder(tmp_path / "named", {"cat": 1, "dog": 1})
    assert main(EVAL + ["--data", str(odd), "--methods", "evit"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tokenpatch: error:") and "'cat' is not an ImageNet WordNet id" in error


@pytest.mark.parametrize("method", ["tome", "ats"])
def test_streamed_scores_do_not_depend_on_the_batching_and_equal_the_whole_set_scores(method):
    model = make_model("deit_small", depth=3)
    x = images(model, batch=11, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    spec = [MethodSpec(method)]
    rows = {size: evaluation_rows(model, in_batches(x, labels, size), spec, x[:4], keep_ratio=0.5, progress=False)
            for size in (3, 11)}
    assert rows[3] == rows[11]
    patched = spec[0].name
    import tokenpatch

    reference = predict(model, x)
    whole = accuracy(predict(tokenpatch.patch(model, patched, keep_ratio=0.5), x), labels, reference)
    assert rows[3][1]["top1"] == pytest.approx(whole.top1) and rows[3][1]["top5"] == pytest.approx(whole.top5)
    assert rows[3][1]["agreement"] == pytest.approx(whole.agreement)


def test_top1_needs_every_image_labelled_but_agreement_needs_none():
    model = make_model("deit_tiny", depth=2)
    x = images(model, batch=4)
    rows = evaluation_rows(model, in_batches(x, torch.tensor([1, -1, 2, 3]), 2), [MethodSpec("evit")], x[:2],
                           progress=False)
    assert rows[1]["top1"] is None and rows[1]["top5"] is None and rows[0]["agreement"] == 100.0


def test_devices_are_checked_in_one_line(capsys):
    for name, words in (("tpu", "unknown device 'tpu'"), ("meta", "not supported"), ("cuda:0", "no CUDA device")):
        if name.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(TokenPatchError, match=words):
            Runtime.named(name)
    assert Runtime.named("cpu", "bf16", True).describe() == "cpu, bf16 autocast, channels-last"


def test_the_cli_refuses_an_unavailable_device_with_exit_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    root = _image_folder(tmp_path, {"": 2})
    for command in (EVAL + ["--data", str(root)], ["audit", "deit_tiny_patch16_224", "--no-pretrained"],
                    ["explain", "deit_tiny_patch16_224", "--no-pretrained", str(root / "0.png"), "--out", str(tmp_path)]):
        assert main(command + ["--device", "cuda"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err.strip().splitlines()[-1]


def test_autocast_and_channels_last_run_the_models_as_asked():
    model = make_model("deit_small", depth=2)
    x = images(model, batch=4)
    reference = predict(model, x)
    last = predict(Runtime(channels_last=True).place(model), x, runtime=Runtime(channels_last=True))
    assert torch.allclose(last, reference, atol=1e-5)
    bf16 = Runtime(amp="bf16")
    seen = []
    handle = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    halved = predict(model, x, runtime=bf16)
    handle.remove()
    assert seen == [torch.bfloat16] and halved.dtype == torch.float32
    assert (halved - reference).abs().max() < 0.1 * reference.abs().max()


def test_output_writes_the_table_as_json_and_csv_with_what_made_it(tmp_path, capsys):
    root = _image_folder(tmp_path / "images", {"": 3})
    out = tmp_path / "results"
    assert main(EVAL + ["--data", str(root), "--methods", "evit", "tome:r=2", "--keep-ratio", "0.5", "--amp", "bf16", "--output", str(out),
                        "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "results.json").read_text())
    assert written["schema_version"] == printed["schema_version"] == 2 and written["results"] == printed["results"]
    assert written["command"].startswith("tokenpatch eval deit_tiny_patch16_224 --no-pretrained")
    assert written["device"] == "cpu, bf16 autocast" and written["weights"] == "random weights"
    assert {"torch", "timm", "transformers", "tokenpatch", "python"} <= set(written["versions"])
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["unpatched", "evit", "tome:r=2"]
    assert list(rows[0]) == ["method", "keep_ratio", "gmacs", "macs_ratio", "agreement"]  # unlabelled: no top-1
    assert [float(r["agreement"]) for r in rows] == [r["agreement"] for r in printed["results"]]


def test_eval_under_torchrun_scores_each_image_once_and_prints_the_one_process_table(tmp_path):
    root = _image_folder(tmp_path / "images", {"": 11})  # odd: a padding sampler would count one image twice
    (root / "labels.csv").write_text("file,class_index\n" + "".join(f"{i}.png,{i * 7}\n" for i in range(11)))
    argv = ["-m", "tokenpatch.cli", *EVAL, "--data", str(root), "--batch-size", "2", "--methods", "tome", "ats",
            "--keep-ratio", "0.5", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = [subprocess.run(prefix + argv, capture_output=True, text=True, env=env, timeout=300)
            for prefix in ([sys.executable], launcher)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    single, double = (json.loads(run.stdout) for run in runs)  # rank 0 alone prints: one JSON object
    assert (single["processes"], double["processes"]) == (1, 2)
    assert single["images"] == double["images"] == 11
    assert all(row["images"] == 11 for row in double["results"])  # each image scored once, by one process
    assert single["results"] == double["results"]


def _synset_copy(shared: Path, target: Path) -> Path:
    """The shared sample as ImageNet's validation layout: WordNet-id class folders (links to the images)."""
    with open(shared / IMAGENET_SAMPLE / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            (target / row["wnid"]).mkdir(parents=True, exist_ok=True)
            os.symlink(shared / IMAGENET_SAMPLE / row["file"], target / row["wnid"] / row["file"])
    return target


def test_the_real_sample_as_synset_folders_gives_the_table_of_its_labels_csv(shared_data, tmp_path, capsys):
    argv = ["eval", "deit_tiny_patch16_224", "--checkpoint", str(shared_data / DEIT_TINY_WEIGHTS), "--methods", "tome",
            "--keep-ratio", "0.5", "-j", "2", "--json"]  # one keep ratio: the tables match without a budget fit
    tables = []
    for folder in (shared_data / IMAGENET_SAMPLE, _synset_copy(shared_data, tmp_path / "val")):
        assert main(argv + ["--data", str(folder)]) == 0
        tables.append(json.loads(capsys.readouterr().out))
    flat, synsets = tables
    assert flat["images"] == synsets["images"] == 500 and flat["labelled"] and synsets["labelled"]
    assert flat["results"] == synsets["results"]
    assert flat["results"][0]["top1"] > 70  # the real labels: DeiT-Tiny's 77 % (not the 0.1 % of re-indexed ones)


def test_tied_logits_rank_alike_for_top1_and_agreement():
    """Half-precision logits tie often; one ranking serves top-1, top-5 and agreement, so the
    unpatched model always agrees with itself."""
    model = make_model("deit_tiny", depth=2)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)  # every class ties
    x = images(model, batch=4)
    rows = evaluation_rows(model, in_batches(x, torch.tensor([0, 1, 2, 3]), 2), [MethodSpec("evit")], x[:2],
                           keep_ratio=0.5, progress=False)
    assert rows[0]["agreement"] == rows[1]["agreement"] == 100.0
    assert rows[0]["top1"] == rows[1]["top1"]
