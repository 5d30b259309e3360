"""Bad input never hurts: every bad file, argument or image gives a one-line error of a
``TokenPatchError`` subclass (the CLI: exit 2), and files and models are left as they were."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tokenpatch
from tokenpatch.backends.build import build_timm_model
from tokenpatch.checkpoint import DIGEST_KEY, METADATA_KEY, load_weights, read_state_dict, tensor_digest
from tokenpatch.cli import main
from tokenpatch.data import image_dataset, read_image
from tokenpatch.errors import (CheckpointError, CheckpointMismatchError, CorruptCheckpointError, DataError,
                               TokenPatchError)

from conftest import METHOD_CASES, case_id, images, make_model


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (and so the set of files)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _flip_tensor_bytes(path: Path) -> None:
    """Overwrite ten bytes of tensor data (the header stays valid) with 0xff."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle:middle + 10] = b"\xff" * 10
    path.write_bytes(bytes(data))


def _tokenpatch_file(folder: Path, name: str = "evit.safetensors", model: str = "deit_tiny") -> Path:
    path = folder / name
    tokenpatch.save(tokenpatch.patch(make_model(model), "evit", keep_ratio=0.3), path)
    return path


def _with_metadata(folder: Path, text: str) -> Path:
    path = folder / "metadata.safetensors"
    save_file(make_model("deit_tiny").state_dict(), str(path), metadata={METADATA_KEY: text})
    return path


# (case, how to make the file in a folder, error class, words of the message)
LOAD_CASES = {
    "missing": (lambda d: d / "missing.safetensors", CheckpointError, "no such file"),
    "a folder": (lambda d: (d / "sub").mkdir() or d / "sub", CheckpointError, "is not a file"),
    "empty": (lambda d: (d / "empty.safetensors").touch() or d / "empty.safetensors", CheckpointError, "is empty"),
    "truncated": (lambda d: _truncated(_tokenpatch_file(d)), CheckpointError, "not a readable safetensors file"),
    "torch file": (lambda d: _torch_file(d), CheckpointError, "not a readable safetensors file"),
    "plain weights": (lambda d: _plain_file(d), CheckpointError, "not a tokenpatch checkpoint"),
    "metadata not JSON": (lambda d: _with_metadata(d, "{oops"), CheckpointError, "metadata is not valid JSON"),
    "metadata not a config": (lambda d: _with_metadata(d, "[1, 2]"), CheckpointError, "metadata must be"),
    "unknown method": (lambda d: _with_metadata(d, '{"method": "nope", "options": {}}'), CheckpointMismatchError,
                       "unknown method 'nope'"),
    "bad option": (lambda d: _with_metadata(d, '{"method": "evit", "options": {"keep_ratio": 7}}'),
                   CheckpointMismatchError, "keep_ratio"),
    "unknown option": (lambda d: _with_metadata(d, '{"method": "evit", "options": {"colour": 1}}'),
                       CheckpointMismatchError, "colour"),
    "wrong model": (lambda d: _tokenpatch_file(d, model="deit_small"), CheckpointMismatchError, "does not fit"),
    "metadata nested 1,500 deep": (lambda d: _with_metadata(d, "[" * 1500 + "]" * 1500), CheckpointError,
                                   "not a configuration tokenpatch reads (RecursionError"),
    "metadata with a 5,000-digit number": (lambda d: _with_metadata(d, '{"method": "evit", "options": {"keep_ratio": '
                                                                       + "1" * 5000 + "}}"),
                                           CheckpointError, "not a configuration tokenpatch reads (ValueError"),
    "iared2 heads of 10**12": (lambda d: _with_metadata(d, '{"method": "iared2", "options": {"heads": 1000000000000}}'),
                               CheckpointMismatchError, "heads must be an integer of at most 2147483647 in size"),
    "iared2 heads of 10**30": (lambda d: _with_metadata(d, '{"method": "iared2", "options": {"heads": 1e30}}'),
                               CheckpointMismatchError, "heads must be an integer"),
    "iared2 heads of 2**31 - 1 (never allocated)": (
        lambda d: _with_metadata(d, '{"method": "iared2", "options": {"heads": 2147483647}}'),
        CheckpointMismatchError, "missing ['tokenpatch.0.heads.bias'"),
    "dynamicvit predictors of another width": (lambda d: _other_width_predictors(d), CheckpointMismatchError,
                                                "shape mismatch ['tokenpatch."),
    "metadata naming the method twice": (lambda d: _with_metadata(d, '{"method": "evit", "method": "tome", "options": {}}'),
                                         CheckpointError, "(ValueError: key 'method' given twice)"),
    "metadata option NaN": (lambda d: _with_metadata(d, '{"method": "evit", "options": {"keep_ratio": NaN}}'),
                            CheckpointMismatchError, "keep_ratio must be a finite number, got nan"),
    "corrupted": (lambda d: _corrupted(_tokenpatch_file(d)), CorruptCheckpointError, "do not match the digest"),
}


def _other_width_predictors(folder: Path) -> Path:
    """A dynamicvit file whose predictor weights are twice as wide as the model's tokens."""
    path = folder / "wide.safetensors"
    state = tokenpatch.patch(make_model("deit_tiny"), "dynamicvit").state_dict()
    state = {k: torch.zeros([2 * n for n in v.shape]) if k.startswith("tokenpatch.") else v for k, v in state.items()}
    save_file(state, str(path), metadata={METADATA_KEY: '{"method": "dynamicvit", "options": {}}'})
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _corrupted(path: Path) -> Path:
    _flip_tensor_bytes(path)
    return path


def _torch_file(folder: Path) -> Path:
    torch.save(make_model("deit_tiny").state_dict(), folder / "weights.pth")
    return folder / "weights.pth"


def _plain_file(folder: Path) -> Path:
    save_file(make_model("deit_tiny").state_dict(), str(folder / "plain.safetensors"))
    return folder / "plain.safetensors"


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_of_a_bad_file_is_one_line_naming_it_and_changes_nothing(tmp_path, case):
    make, error, words = LOAD_CASES[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    model = make_model("deit_tiny")
    weights = _weights(model)
    with pytest.raises(error) as raised:
        tokenpatch.load(model, path)
    message = str(raised.value)
    assert words in message and str(path) in message and "\n" not in message
    assert not tokenpatch.is_patched(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert _snapshot(tmp_path) == before


def test_a_saved_file_records_the_digest_of_its_tensors(tmp_path):
    from safetensors import safe_open

    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    tokenpatch.save(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        saved = f.metadata()[DIGEST_KEY]
    assert saved == tensor_digest(model.state_dict())
    changed = {**model.state_dict(), "cls_token": model.cls_token.detach() + 1e-6}
    assert tensor_digest(changed) != saved


def test_files_saved_before_the_digest_existed_still_load(tmp_path):
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.4)
    config = json.dumps({"method": "evit", "options": tokenpatch.get_config(model).to_dict()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={METADATA_KEY: config})
    loaded = tokenpatch.load(make_model("deit_tiny"), tmp_path / "old.safetensors")
    assert tokenpatch.get_config(loaded).keep_ratio == 0.4


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_save_writes_files_with_the_users_umask(tmp_path, umask):
    model = tokenpatch.patch(make_model("deit_tiny"), "idle")
    previous = os.umask(umask)
    try:
        tokenpatch.save(model, tmp_path / "m.safetensors")
        tokenpatch.save_config(model, tmp_path / "m.json")
    finally:
        os.umask(previous)
    for name in ("m.safetensors", "m.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    model = tokenpatch.patch(make_model("deit_tiny"), "idle")
    target = _tokenpatch_file(tmp_path)
    before = _snapshot(tmp_path)

    def half_written(state, name, metadata=None):
        Path(name).write_bytes(b"half")
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr("tokenpatch.checkpoint.save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        tokenpatch.save(model, target)
    assert _snapshot(tmp_path) == before


def test_save_into_a_missing_folder_is_one_line(tmp_path):
    model = tokenpatch.patch(make_model("deit_tiny"), "idle")
    with pytest.raises(CheckpointError, match="cannot write .*no_folder.*No such file"):
        tokenpatch.save(model, tmp_path / "no_folder" / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


WEIGHT_CASES = {
    "missing": (lambda d: d / "missing.pth", CheckpointError, "no such file"),
    "not a torch file": (lambda d: (d / "junk.pth").write_bytes(b"junk" * 40) and d / "junk.pth", CheckpointError,
                         "not a torch state dict"),
    "a list": (lambda d: torch.save([torch.zeros(1)], d / "list.pth") or d / "list.pth", CheckpointError,
               "holds a list"),
    "not tensors": (lambda d: torch.save({"a": 1}, d / "ints.pth") or d / "ints.pth", CheckpointError,
                    "not a state dict"),
    "wrong keys": (lambda d: save_file({"w": torch.zeros(2)}, str(d / "w.safetensors")) or d / "w.safetensors",
                   CheckpointMismatchError, "does not fit"),
    "truncated safetensors": (lambda d: _truncated(_plain_file(d)), CheckpointError, "not a readable safetensors"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_plain_weights_that_cannot_load_are_one_line_and_change_nothing(tmp_path, case):
    make, error, words = WEIGHT_CASES[case]
    path = make(tmp_path)
    model = make_model("deit_tiny")
    weights = _weights(model)
    with pytest.raises(error) as raised:
        load_weights(model, path)
    assert words in str(raised.value) and str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_weights_under_a_model_key_load(tmp_path):
    source = make_model("deit_tiny")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == set(source.state_dict())


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_a_batch_of_zero_images_gives_an_empty_output_of_the_right_shape(case):
    name, options = case
    model = make_model("deit_tiny")
    empty = images(model, batch=0)
    expected = model(empty)
    patched = tokenpatch.patch(model, name, keep_ratio=0.5, **options)
    with torch.no_grad():
        out = patched(empty)
        features = patched.forward_features(empty)
    assert out.shape == expected.shape == (0, 10)
    assert features.shape == (0, 17, 192)
    assert patched(images(model, batch=2)).shape == (2, 10)  # the next pass is a normal one


@pytest.mark.parametrize("write, words", [
    (lambda p: p.write_text("not an image"), "cannot read image"),
    (lambda p: p.write_bytes(_png_bytes()[:60]), "cannot read image"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: None, "no such image file"),
])
def test_an_unreadable_image_is_a_data_error_naming_it(tmp_path, write, words):
    path = tmp_path / "picture.png"
    write(path)
    with pytest.raises(DataError, match=words) as raised:
        read_image(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("labels, words", [
    ("name,label\na.png,1\n", "must have the columns file,class_index"),
    ("file,class_index\n", "must have the columns"),
    ("file,class_index\n0.png,cat\n", "line 2: class_index must be a non-negative integer, got 'cat'"),
    ("file,class_index\n0.png,1\n0.png\n", "line 3: expected file,class_index, got \\['0.png', None\\]"),
    ("file,class_index\n0.png,\u00b2\n", "line 2: class_index must be a non-negative integer, got '\u00b2'"),
])
def test_a_bad_labels_file_is_a_data_error(tmp_path, labels, words):
    (tmp_path / "0.png").write_bytes(_png_bytes())
    (tmp_path / "labels.csv").write_text(labels)
    with pytest.raises(DataError, match=words):
        image_dataset(tmp_path)


def test_a_labels_file_that_starts_with_a_byte_order_mark_reads_as_any_other(tmp_path):
    """Spreadsheets write UTF-8 CSV files with a BOM; its header is still file,class_index."""
    (tmp_path / "0.png").write_bytes(_png_bytes())
    (tmp_path / "labels.csv").write_text("\ufefffile,class_index\n0.png,3\n", encoding="utf-8")
    assert [label for _, label in image_dataset(tmp_path)] == [3]


def test_saving_to_a_path_that_names_no_file_is_one_line(tmp_path):
    model = tokenpatch.patch(make_model("deit_tiny"), "evit")
    for path in ["", ".", str(tmp_path) + "/.."]:
        with pytest.raises(CheckpointError, match="it names no file"):
            tokenpatch.save(model, path)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_images_that_are_not_floating_point_are_one_line(dtype):
    """Raw pixels given without the model's transform: named, not torch's mismatch of input and bias types."""
    model = tokenpatch.patch(make_model("deit_tiny"), "evit")
    with pytest.raises(TokenPatchError, match=f"expected floating-point images, .* got {dtype}"):
        model(images(model).to(dtype))


@pytest.mark.parametrize("batch, words", [
    (torch.zeros(2, 1, 64, 64), r"expected images with 3 channels, got 1 \(shape \(2, 1, 64, 64\)\)"),
    (torch.zeros(2, 3, 48, 48), "this model takes 64x64 images, got 48x48"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.float64), "images are torch.float64 but the model's weights torch.float32"),
])
def test_images_the_patch_embedding_cannot_take_are_one_line(batch, words):
    """Where timm's patch embedding would fail deep inside torch (conv2d, an assert), the patched model says why."""
    model = tokenpatch.patch(make_model("deit_tiny"), "evit")
    with pytest.raises(TokenPatchError, match=words):
        model(batch)


def test_images_of_another_dtype_run_under_autocast():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit")
    with pytest.raises(TokenPatchError, match="images are torch.bfloat16 but the model's weights torch.float32"):
        model(images(model).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the images itself
        assert model(images(model, batch=2).bfloat16()).shape == (2, 10)


def test_a_folder_without_images_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no images"):
        image_dataset(tmp_path)
    with pytest.raises(DataError, match="no image folder"):
        image_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------- the command line

MODEL = "deit_tiny_patch16_224"


@pytest.fixture
def files(tmp_path):
    """A folder of 6 small images (and a copy, ``broken/``, with one corrupt), an empty folder, plain
    weights and a tokenpatch file (evit at 0.3) of the 32 px model, bad weights files, a text file."""
    images_dir, broken = tmp_path / "images", tmp_path / "broken"
    images_dir.mkdir()
    broken.mkdir()
    for i in range(6):
        (images_dir / f"{i}.png").write_bytes(_png_bytes())
        (broken / f"{i}.png").write_bytes(_png_bytes())
    (broken / "5.png").write_text("not an image")
    model = build_timm_model(MODEL, 32)
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    tokenpatch.save(tokenpatch.patch(model, "evit", keep_ratio=0.3), tmp_path / "evit.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"junk" * 40)
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "empty.safetensors").touch()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((tmp_path / "evit.safetensors").read_bytes())
    _flip_tensor_bytes(corrupt)
    (tmp_path / "note.txt").write_text("hello")
    (tmp_path / "nothing").mkdir()
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it to read would wait for a writer forever
    beyond = tmp_path / "beyond"  # a class index beyond the 1000 of the model's head
    beyond.mkdir()
    for i in range(4):
        (beyond / f"{i}.png").write_bytes(_png_bytes())
    (beyond / "labels.csv").write_text("file,class_index\n0.png,1\n1.png,5000\n2.png,2\n3.png,3\n")
    return tmp_path


AUDIT = ["audit", MODEL, "--no-pretrained", "--img-size", "32", "--batch-size", "1", "--repeats", "1"]
TUNE = ["finetune", MODEL, "--no-pretrained", "--steps", "1", "--batch-size", "2"]
BAD_COMMANDS = {
    # the parser's checks
    "audit: unknown command": (["bogus"], "invalid choice: 'bogus'"),
    "audit: no model": (["audit"], "the following arguments are required: model"),
    "audit: keep ratio above 1": (AUDIT + ["--keep-ratio", "1.5"], "keep ratio must be a number in (0, 1]"),
    "audit: macs ratio 0": (AUDIT + ["--macs-ratio", "0"], "macs ratio must be a number in (0, 1]"),
    "audit: keep and macs ratio": (AUDIT + ["--keep-ratio", "0.5", "--macs-ratio", "0.5"], "not allowed with"),
    "audit: unknown method": (AUDIT + ["--method", "nope"], "invalid choice: 'nope'"),
    "audit: batch of 0": (AUDIT + ["--batch-size", "0"], "expected an integer in [1, inf)"),
    "audit: negative repeats": (AUDIT + ["--repeats", "-3"], "expected an integer in [1, inf)"),
    "audit: option without =": (AUDIT + ["--option", "fuse"], "expected KEY=VALUE"),
    "finetune: val fraction 1.5": (TUNE + ["--data", "{d}/images", "--val-fraction", "1.5"], "in (0, 1)"),
    "finetune: val fraction 0": (TUNE + ["--data", "{d}/images", "--val-fraction", "0"], "in (0, 1)"),
    "finetune: negative lr": (TUNE + ["--data", "{d}/images", "--lr", "-1"], "--lr: expected a number in (0, inf)"),
    "finetune: nan lr": (TUNE + ["--data", "{d}/images", "--lr", "nan"], "--lr: expected a number"),
    "finetune: negative mixup": (TUNE + ["--data", "{d}/images", "--mixup", "-1"], "--mixup: expected a number in [0"),
    "finetune: negative fold": (TUNE + ["--data", "{d}/images", "--fold", "-1"], "--fold: expected an integer in [0"),
    "finetune: negative label weight": (TUNE + ["--data", "{d}/images", "--label-weight", "-1"], "--label-weight"),
    "finetune: minutes 0": (TUNE[:2] + ["--data", "{d}/images", "--minutes", "0"], "--minutes: expected a number"),
    "finetune: steps and minutes": (TUNE + ["--data", "{d}/images", "--minutes", "1"], "not allowed with"),
    # the jobs' checks
    "audit: unknown model": (["audit", "no_such_model"], "unknown timm model 'no_such_model'"),
    "audit: missing checkpoint": (AUDIT + ["--checkpoint", "{d}/none.safetensors"], "none.safetensors: no such file"),
    "audit: empty checkpoint": (AUDIT + ["--checkpoint", "{d}/empty.safetensors"], "empty.safetensors is empty"),
    "audit: not a torch file": (AUDIT + ["--checkpoint", "{d}/junk.pth"], "junk.pth is not a torch state dict"),
    "audit: a list": (AUDIT + ["--checkpoint", "{d}/list.pth"], "list.pth holds a list"),
    "audit: wrong model": (["audit", MODEL, "--no-pretrained", "--img-size", "48", "--checkpoint", "{d}/plain.safetensors"],
                           "does not fit this VisionTransformer"),
    "audit: corrupt tokenpatch file": (AUDIT + ["--checkpoint", "{d}/corrupt.safetensors"], "is corrupted"),
    "audit: option of another method": (AUDIT + ["--method", "evit", "--option", "r=3"], "unknown option"),
    "audit: infinite option": (AUDIT + ["--method", "pitome", "--option", "margin=1e999"],
                               "margin must be a finite number, got inf"),
    "audit: 5000-digit option": (AUDIT + ["--method", "tome", "--option", "r=" + "1" * 5000],
                                 "r must be an integer or None, got '1111"),
    "audit: deeply nested option": (AUDIT + ["--method", "tome", "--option", "r=" + "[" * 1500 + "]" * 1500],
                                    "r must be an integer or None, got '[[[["),
    "eval: class index beyond the head": (["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/beyond"],
                                          "class index 5000 is beyond the model's 1000 classes"),
    "finetune: class index beyond the head": (TUNE + ["--data", "{d}/beyond", "--label-weight", "1"],
                                              "class index 5000 is beyond the model's 1000 classes"),
    "audit: image size 8": (["audit", MODEL, "--no-pretrained", "--img-size", "8"],
                            "img_size 8 is not a multiple of deit_tiny_patch16_224's patch size 16"),
    "audit: image size 17": (["audit", MODEL, "--no-pretrained", "--img-size", "17"], "is not a multiple of"),
    "audit: batch beyond memory": (["audit", MODEL, "--no-pretrained", "--img-size", "32", "--batch-size", "100000000000",
                                    "--repeats", "1"], "not enough memory for this run"),
    "audit: a FIFO as checkpoint": (AUDIT + ["--checkpoint", "{d}/fifo.safetensors"], "fifo.safetensors is not a file"),
    "audit: keep ratio twice": (AUDIT + ["--keep-ratio", "0.5", "--option", "keep_ratio=0.6"],
                                "keep_ratio given twice (0.5 and keep_ratio=0.6)"),
    "audit: keep ratio option and macs ratio": (AUDIT + ["--macs-ratio", "0.7", "--option", "keep_ratio=0.6"],
                                                "keep_ratio=0.6 and a macs ratio (0.7) both set the budget"),
    "eval: keep ratio twice": (["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/images",
                                "--keep-ratio", "0.5", "--methods", "evit:keep_ratio=0.6"], "keep_ratio given twice"),
    "audit: an option given twice": (AUDIT + ["--method", "tome", "--option", "r=3", "--option", "r=4"],
                                     "option r given twice (r='3' and r='4')"),
    "eval: an option given twice": (["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/images",
                                     "--methods", "tome:r=3,r=4"], "option r given twice"),
    "eval: a method named twice": (["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/images",
                                    "--methods", "evit", "tome", "evit"], "--methods names evit twice"),
    "audit: --output is a file": (AUDIT + ["--output", "{d}/note.txt"], "note.txt is a file, not a folder for results"),
    "explain: --out is a file": (["explain", MODEL, "--no-pretrained", "{d}/images/0.png", "--out", "{d}/note.txt"],
                                 "--out {d}/note.txt is a file: give a folder"),
    "eval: missing folder": (["eval", MODEL, "--no-pretrained", "--data", "{d}/nowhere"], "no image folder at"),
    "eval: folder without images": (["eval", MODEL, "--no-pretrained", "--data", "{d}/nothing"], "no images"),
    "eval: corrupt image": (["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/broken", "--methods", "evit"],
                            "cannot read image {d}/broken/5.png"),
    "eval: not a torch file": (["eval", MODEL, "--no-pretrained", "--data", "{d}/images", "--checkpoint", "{d}/junk.pth"],
                               "junk.pth is not a torch state dict"),
    "finetune: weights become infinite": (TUNE + ["--data", "{d}/images", "--lr", "1e308", "--out", "{d}/m.safetensors"],
                                          "the weights became non-finite in the last step (1)"),
    "finetune: loss becomes infinite": (TUNE[:-4] + ["--steps", "3", "--batch-size", "2", "--data", "{d}/images", "--lr",
                                                     "1e308", "--out", "{d}/m.safetensors"], "the loss became nan at step 2"),
    "finetune: missing folder": (TUNE + ["--data", "{d}/nowhere"], "no image folder at"),
    "finetune: corrupt image": (TUNE + ["--data", "{d}/broken", "--val-fraction", "0.5", "--batch-size", "3"],
                                "cannot read image {d}/broken/"),
    "finetune: fold out of range": (TUNE + ["--data", "{d}/images", "--fold", "9"], "--fold 9 out of range"),
    "finetune: out in a missing folder": (TUNE + ["--data", "{d}/images", "--out", "{d}/no/m.safetensors"],
                                          "cannot write {d}/no/m.safetensors"),
    "finetune: out is a folder": (TUNE + ["--data", "{d}/images", "--out", "{d}/images"], "it is a folder"),
    "finetune: corrupt checkpoint": (TUNE + ["--data", "{d}/images", "--checkpoint", "{d}/corrupt.safetensors"],
                                     "is corrupted"),
    "explain: not an image": (["explain", MODEL, "--no-pretrained", "{d}/note.txt", "--out", "{d}/maps"], "cannot read image"),
    "explain: a folder": (["explain", MODEL, "--no-pretrained", "{d}/images", "--out", "{d}/maps"], "images is a folder; give image"),
    "explain: missing image": (["explain", MODEL, "--no-pretrained", "{d}/none.png", "--out", "{d}/maps"], "none.png: no such image"),
    "explain: truncated checkpoint": (["explain", MODEL, "--no-pretrained", "{d}/images/0.png", "--out", "{d}/maps", "--checkpoint",
                                       "{d}/list.pth"], "holds a list"),
}


def _exit_code(argv: list[str]) -> int:
    """What ``tokenpatch argv`` exits with: ``main``'s return, or the parser's exit."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_a_bad_command_exits_2_with_one_line_and_touches_no_file(files, capsys, case):
    argv, words = BAD_COMMANDS[case]
    before = _snapshot(files)
    assert _exit_code([a.format(d=files) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars, then the error
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith("tokenpatch") and words.format(d=files) in lines[-1], err
    assert _snapshot(files) == before


def test_the_cli_shows_the_traceback_of_a_bug(monkeypatch):
    """Only user errors become one line: an internal error is not hidden behind exit 2."""
    monkeypatch.setattr("tokenpatch.cli.commands.audit_rows", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(AUDIT)


def _audit_json(argv, capsys) -> dict:
    assert main(AUDIT + argv + ["--json"]) == 0
    row, = json.loads(capsys.readouterr().out)["results"]
    return row


def test_audit_of_a_tokenpatch_file_uses_its_method_and_options_unless_told_otherwise(files, capsys):
    checkpoint = ["--checkpoint", str(files / "evit.safetensors")]
    assert (lambda r: (r["method"], r["keep_ratio"]))(_audit_json(checkpoint, capsys)) == ("evit", 0.3)
    assert (lambda r: (r["method"], r["keep_ratio"]))(_audit_json(checkpoint + ["--keep-ratio", "0.6"], capsys)) == (
        "evit", 0.6)
    assert (lambda r: (r["method"], r["keep_ratio"]))(_audit_json(checkpoint + ["--method", "idle"], capsys)) == (
        "idle", 0.5)
    fused = _audit_json(checkpoint + ["--option", "fuse=true"], capsys)
    assert (fused["method"], fused["keep_ratio"]) == ("evit", 0.3)


def test_eval_of_a_tokenpatch_file_compares_its_model_with_the_unpatched_one(files, capsys):
    argv = ["eval", MODEL, "--img-size", "32", "--data", str(files / "images"), "--json"]
    assert main(argv + ["--checkpoint", str(files / "evit.safetensors")]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [("unpatched", None), ("evit (checkpoint)", 0.3)]
    assert main(argv + ["--checkpoint", str(files / "evit.safetensors"), "--methods", "idle"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["method"] for r in rows] == ["unpatched", "idle"]


def test_finetune_continues_a_tokenpatch_file_with_its_method_and_options(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png_bytes())
    saved = tmp_path / "evit.safetensors"
    tokenpatch.save(tokenpatch.patch(build_timm_model(MODEL), "evit", keep_ratio=0.3), saved)
    assert main(TUNE + ["--data", str(folder), "--val-fraction", "0.5", "--checkpoint", str(saved), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["method"], result["keep_ratio"]) == ("evit", 0.3)
    assert main(TUNE + ["--data", str(folder), "--val-fraction", "0.5", "--checkpoint", str(saved), "--json",
                        "--method", "idle"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["method"], result["keep_ratio"]) == ("idle", 0.5)


@pytest.mark.parametrize("argv", [AUDIT + ["--method", "evit", "--option", "keep_ratio=0.6"],
                                  ["eval", MODEL, "--no-pretrained", "--img-size", "32", "--data", "{d}/images",
                                   "--methods", "evit:keep_ratio=0.6", "--json"]])
def test_a_keep_ratio_given_as_an_option_is_the_keep_ratio(files, capsys, argv):
    assert _exit_code([a.format(d=files) for a in argv]) == 0
    assert "0.6" in capsys.readouterr().out


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokenpatch.cli.commands.audit_rows", interrupted)
    assert main(AUDIT) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tokenpatch: interrupted"


def test_token_patch_errors_are_value_errors():
    for error in (CheckpointError, CorruptCheckpointError, CheckpointMismatchError, DataError):
        assert issubclass(error, TokenPatchError) and issubclass(error, ValueError)


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_a_nan_pixel_spoils_only_its_own_image(case):
    name, options = case
    model = tokenpatch.patch(make_model("deit_tiny", img_size=64), name, keep_ratio=0.5, **options)
    x = images(model, batch=3)
    x[1, 0, 5, 5] = float("nan")
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in (0, 2)])
    assert together[1].isnan().all()  # as the unpatched model gives
    assert torch.allclose(together[[0, 2]], alone, atol=1e-4)


@pytest.mark.parametrize("method, option, value, words", [
    ("evit", "keep_ratio", float("inf"), "keep_ratio must be a finite number"),
    ("dynamicvit", "ratio_weight", float("inf"), "ratio_weight must be a finite number"),
    ("idle", "cut_weight", float("inf"), "cut_weight must be a finite number"),
    ("ppt", "threshold", float("inf"), "threshold must be a finite number"),
    ("pitome", "margin", float("-inf"), "margin must be a finite number"),
    ("tome", "r", 10**30, "r must be an integer of at most 2147483647 in size"),
    ("ats", "points", 10**30, "points must be an integer of at most 2147483647 in size"),
    ("sait", "mass", 10**400, "mass must be a finite number, got 1000000000"),
    ("tome", "remaining", (1.0, float("inf")), "remaining must be a finite number"),
])
def test_absurd_option_values_are_refused_at_patch_time_and_leave_the_model_unpatched(method, option, value, words):
    model = make_model("deit_tiny", depth=2)
    with pytest.raises(tokenpatch.InvalidOptionError, match=re.escape(words)):
        tokenpatch.patch(model, method, **{option: value})
    assert not tokenpatch.is_patched(model)


def test_sigterm_during_a_save_leaves_no_temporary_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tokenpatch.checkpoint import write_atomically\n"
        "def slow(name):\n"
        "    Path(name).write_text('partial')\n"
        "    time.sleep(60)\n"
        "write_atomically(sys.argv[1], slow)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "model.safetensors")])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*.tmp")) or not next(tmp_path.glob(".*.tmp")).stat().st_size:
        assert time.monotonic() < deadline and child.poll() is None, "the child never started writing"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_timm_gradient_checkpointing_is_refused_in_eval_mode_too_when_gradients_flow(case):
    """timm's ViT checkpoints its blocks whenever ``grad_checkpointing`` is set, in eval mode too."""
    name, options = case
    model = tokenpatch.patch(make_model("deit_tiny"), name, keep_ratio=0.5, **options)
    model.set_grad_checkpointing(True)
    x = images(model, batch=2)
    with pytest.raises(TokenPatchError, match="gradient checkpointing re-runs blocks.*set_grad_checkpointing\\(False\\)"):
        model(x)
    with torch.no_grad():  # nothing is re-run without gradients
        assert model(x).shape == (2, 10)
    model.set_grad_checkpointing(False)
    model(x).sum().backward()


def test_transformers_gradient_checkpointing_is_refused_in_training_only():
    from hf_convert import hf_twin

    model = tokenpatch.patch(hf_twin(make_model("deit_tiny")), "evit", keep_ratio=0.5)
    model.activation_checkpointing_enable()
    x = images(make_model("deit_tiny"), batch=2)
    model(pixel_values=x)  # eval mode: transformers' layers do not checkpoint
    model.train()
    with pytest.raises(TokenPatchError, match="model.activation_checkpointing_disable"):
        model(pixel_values=x)


@pytest.mark.parametrize("method", sorted(tokenpatch.available_methods()))
def test_plain_weights_load_into_a_patched_model_as_the_readme_says(method):
    weights = make_model("deit_tiny").state_dict()
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), method)
    torch.nn.init.zeros_(model.head.weight)
    own = {k for k in model.state_dict() if k.startswith("tokenpatch.")}
    if own:  # dynamicvit, iared2: their modules are not in a plain state dict
        with pytest.raises(RuntimeError, match="Missing key"):
            model.load_state_dict(weights)
        result = model.load_state_dict(weights, strict=False)
        assert set(result.missing_keys) == own and not result.unexpected_keys
    else:
        model.load_state_dict(weights)
    assert torch.equal(model.head.weight, weights["head.weight"])
