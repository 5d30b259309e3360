"""Hand-made hostile and odd inputs (issue 36's second round): each is tried and its outcome
printed, with a verdict: ``ok`` when it is a one-line tokenpatch error (the API), exit 2 with one
line (the CLI) or a sound result, ``FAIL`` otherwise (another exception, a traceback, exit 1).

    python benchmarks/hostile_inputs.py [--markdown] [NAME_PART ...]

Runs offline (``HF_HUB_OFFLINE=1``) on small random-weight models in a temporary folder, about a
minute on 2 CPU cores. The cases that failed before their fix are also in
``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import tokenpatch
from tokenpatch.backends.build import build_timm_model
from tokenpatch.checkpoint import METADATA_KEY
from tokenpatch.cli import main as cli_main
from tokenpatch.errors import TokenPatchError

D = Path(tempfile.mkdtemp(prefix="hostile-"))
MODEL = "deit_tiny_patch16_224"


def make_model() -> torch.nn.Module:
    """A depth-4 DeiT-Tiny at 64 px with 10 classes and random weights."""
    torch.manual_seed(0)
    return timm.create_model(MODEL, depth=4, img_size=64, num_classes=10).eval()


def png(path: Path, size=(40, 40), mode="RGB") -> None:
    colour = 128 if mode == "L" else (1, 2, 3, 4) if mode == "CMYK" else (10, 200, 30, 255)[: len(mode)]
    Image.new(mode, size, colour).save(path)


imgs = D / "images"
imgs.mkdir()
for i in range(4):
    png(imgs / f"{i}.png")
save_file(build_timm_model(MODEL, 32).state_dict(), str(D / "plain.safetensors"))
tokenpatch.save(tokenpatch.patch(build_timm_model(MODEL, 32), "evit", keep_ratio=0.3), D / "evit.safetensors")


def api(fn) -> tuple[str, bool]:
    """Run one API probe: (outcome, sound)."""
    try:
        return f"returns {fn()}"[:150], True
    except Exception as e:  # the probe's subject
        lines = str(e).strip().splitlines()
        sound = isinstance(e, TokenPatchError) and len(lines) == 1
        return f"{type(e).__name__}: {lines[0][:130] if lines else ''}", sound


def cli(argv) -> tuple[str, bool]:
    """Run one command-line probe: (outcome, sound)."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli_main(["-q" if a == "-q" else a.format(d=D) for a in argv])
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # the probe's subject
        return f"escaped {type(e).__name__}: {str(e)[:120]}", False
    lines = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    traceback = "Traceback" in err.getvalue()
    shown = lines[-1][:140] if code else "ok"
    return f"exit {code}: {shown}", code in (0, 2) and not traceback


m = make_model
x = torch.randn(2, 3, 64, 64)
PROBES = {}  # name -> a call returning (outcome, sound)

# --- API
PROBES["patch method=None"] = lambda: api(lambda: tokenpatch.patch(m(), None))
PROBES["patch method=123"] = lambda: api(lambda: tokenpatch.patch(m(), 123))
PROBES["patch method=' evit'"] = lambda: api(lambda: tokenpatch.patch(m(), " evit"))
PROBES["patch method='EViT'"] = lambda: api(lambda: tokenpatch.patch(m(), "EViT"))
PROBES["keep_ratio='0.5'"] = lambda: api(lambda: tokenpatch.patch(m(), "evit", keep_ratio="0.5"))
PROBES["keep_ratio=True"] = lambda: api(lambda: tokenpatch.patch(m(), "evit", keep_ratio=True))
PROBES["keep_ratio=tensor(0.5)"] = lambda: api(
    lambda: tokenpatch.get_config(tokenpatch.patch(m(), "evit", keep_ratio=torch.tensor(0.5))).keep_ratio
)
PROBES["keep_ratio=np.float32(0.5)"] = lambda: api(
    lambda: tokenpatch.get_config(tokenpatch.patch(m(), "evit", keep_ratio=np.float32(0.5))).keep_ratio
)
PROBES["keep_ratio=1e-300 forward"] = lambda: api(lambda: tokenpatch.patch(m(), "evit", keep_ratio=1e-300)(x).shape)
PROBES["keep_ratio=1e-300 tome forward"] = lambda: api(
    lambda: tokenpatch.patch(m(), "tome", keep_ratio=1e-300)(x).shape
)
PROBES["macs_ratio=1e-9"] = lambda: api(lambda: tokenpatch.patch(m(), "evit", macs_ratio=1e-9))
PROBES["patch nn.Linear"] = lambda: api(lambda: tokenpatch.patch(torch.nn.Linear(2, 2), "evit"))
PROBES["patch nn.Sequential(vit)"] = lambda: api(lambda: tokenpatch.patch(torch.nn.Sequential(m()), "evit"))
PROBES["patch DataParallel(vit)"] = lambda: api(lambda: tokenpatch.patch(torch.nn.DataParallel(m()), "evit"))
PROBES["patch a class, not an instance"] = lambda: api(lambda: tokenpatch.patch(type(m()), "evit"))
PROBES["patch a meta-device vit"] = lambda: api(
    lambda: tokenpatch.patch(m().to("meta"), "dynamicvit")(x.to("meta")).shape
)
PROBES["call uint8 images"] = lambda: api(
    lambda: tokenpatch.patch(m(), "evit")(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
)
PROBES["call unbatched (3,H,W)"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")(torch.zeros(3, 64, 64)))
PROBES["call 1 channel"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")(torch.zeros(2, 1, 64, 64)))
PROBES["call 48 px on a 64 px model"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")(torch.zeros(2, 3, 48, 48)))
PROBES["call float64 input"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")(x.double()).dtype)
PROBES["call a list of tensors"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")([x[0], x[1]]))
PROBES["call a numpy array"] = lambda: api(lambda: tokenpatch.patch(m(), "evit")(x.numpy()))
PROBES["call non-contiguous (transposed) input"] = lambda: api(
    lambda: bool(
        torch.allclose(
            tokenpatch.patch(m(), "evit")(x.transpose(2, 3).contiguous().transpose(2, 3)),
            tokenpatch.patch(m(), "evit")(x),
            atol=1e-5,
        )
    )
)
PROBES["set_keep_ratio nan"] = lambda: api(
    lambda: tokenpatch.set_keep_ratio(tokenpatch.patch(m(), "evit"), float("nan"))
)
PROBES["set_keep_ratio on unpatched"] = lambda: api(lambda: tokenpatch.set_keep_ratio(m(), 0.5))
PROBES["set_options unknown"] = lambda: api(lambda: tokenpatch.set_options(tokenpatch.patch(m(), "evit"), colour=1))
PROBES["unpatch twice"] = lambda: api(lambda: tokenpatch.unpatch(tokenpatch.unpatch(tokenpatch.patch(m(), "evit"))))
PROBES["save unpatched model"] = lambda: api(lambda: tokenpatch.save(m(), D / "u.safetensors"))
PROBES["save to ''"] = lambda: api(lambda: tokenpatch.save(tokenpatch.patch(m(), "evit"), ""))
PROBES["save to an existing folder"] = lambda: api(lambda: tokenpatch.save(tokenpatch.patch(m(), "evit"), D / "images"))
PROBES["load path with NUL byte"] = lambda: api(lambda: tokenpatch.load(m(), "a\0b.safetensors"))


def loop():
    (D / "loop").unlink(missing_ok=True)
    os.symlink(D / "loop", D / "loop")
    return tokenpatch.load(m(), D / "loop")


PROBES["load a symlink loop"] = lambda: api(loop)
PROBES["load /dev/zero"] = lambda: api(lambda: tokenpatch.load(m(), "/dev/zero"))
PROBES["load_weights /dev/zero"] = lambda: api(lambda: tokenpatch.checkpoint.load_weights(m(), "/dev/zero"))


def meta(text, name="meta.safetensors", state=None):
    save_file(state or make_model().state_dict(), str(D / name), metadata={METADATA_KEY: text})
    return api(lambda: tokenpatch.get_config(tokenpatch.load(m(), D / name)))


PROBES["metadata keep_ratio as a list"] = lambda: meta('{"method": "evit", "options": {"keep_ratio": [0.5]}}')
PROBES["metadata method as a list"] = lambda: meta('{"method": ["evit"], "options": {}}')
PROBES["metadata method '../evit'"] = lambda: meta('{"method": "../evit", "options": {}}')
PROBES["metadata duplicated key"] = lambda: meta('{"method": "evit", "method": "tome", "options": {}}')
PROBES["metadata option NaN literal"] = lambda: meta('{"method": "evit", "options": {"keep_ratio": NaN}}')
PROBES["metadata option Infinity literal"] = lambda: meta('{"method": "sait", "options": {"mass": Infinity}}')
PROBES["metadata option key '__class__'"] = lambda: meta('{"method": "evit", "options": {"__class__": 1}}')
PROBES["metadata option outputs"] = lambda: meta('{"method": "evit", "options": {"outputs": "reduced"}}')
PROBES["metadata option macs_ratio"] = lambda: meta('{"method": "evit", "options": {"macs_ratio": 0.5}}')
PROBES["metadata 10 MB string"] = lambda: meta(json.dumps({"method": "evit" * 2_500_000, "options": {}}))
PROBES["file of float16 tensors"] = lambda: meta(
    '{"method": "evit", "options": {}}', "half.safetensors", {k: v.half() for k, v in make_model().state_dict().items()}
)


def torchfile(obj, name):
    torch.save(obj, D / name)
    return api(lambda: type(tokenpatch.checkpoint.load_weights(m(), D / name)).__name__)


PROBES["torch file with int keys"] = lambda: torchfile({1: torch.zeros(1)}, "intkeys.pth")
PROBES["torch file model->model nesting"] = lambda: torchfile(
    {"model": {"model": make_model().state_dict()}}, "nested.pth"
)
PROBES["torch file: a bare tensor"] = lambda: torchfile(torch.zeros(3), "tensor.pth")
PROBES["torch file: None"] = lambda: torchfile(None, "none.pth")
PROBES["load_official without a method on an idle file"] = lambda: api(
    lambda: tokenpatch.checkpoint.load_official(m(), D / "plain.safetensors")
)

# --- CLI
A = ["audit", MODEL, "--no-pretrained", "--img-size", "32", "--batch-size", "1", "--repeats", "1"]
TUNE = ["finetune", MODEL, "--no-pretrained", "--data", "{d}/images"]
E = ["eval", MODEL, "--no-pretrained", "--img-size", "32", "--methods", "evit"]
for name, argv in {
    "audit --img-size 0": ["audit", MODEL, "--no-pretrained", "--img-size", "0"],
    "audit --img-size -32": ["audit", MODEL, "--no-pretrained", "--img-size", "-32"],
    "audit --img-size 32.0": ["audit", MODEL, "--no-pretrained", "--img-size", "32.0"],
    "audit --batch-size 1e3": A[:-4] + ["--batch-size", "1e3"],
    "audit --repeats 0x10": A[:-2] + ["--repeats", "0x10"],
    "audit --device cuda (none here)": A + ["--device", "cuda"],
    "audit --device tpu": A + ["--device", "tpu"],
    "audit --device cuda:99": A + ["--device", "cuda:99"],
    "audit --amp float8": A + ["--amp", "float8"],
    "audit --methods ''": A + ["--methods", ""],
    "audit --option '=3'": A + ["--method", "tome", "--option", "=3"],
    "audit --option 'r='": A + ["--method", "tome", "--option", "r="],
    "audit --option unicode key": A + ["--method", "tome", "--option", "ř=3"],
    "audit --option r=3 r=4 (twice)": A + ["--method", "tome", "--option", "r=3", "--option", "r=4"],
    "audit --checkpoint /dev/zero": A + ["--checkpoint", "/dev/zero"],
    "audit --checkpoint a folder": A + ["--checkpoint", "{d}/images"],
    "audit --output into a missing folder": A + ["--output", "{d}/no/where"],
    "audit --output is a file": A + ["--output", "{d}/plain.safetensors"],
    "audit hf-hub model not cached": ["audit", "hf-hub:nobody/nothing", "--img-size", "32"],
    "audit model '../../etc/passwd'": ["audit", "../../etc/passwd"],
    "audit model empty string": ["audit", ""],
    "audit a local folder without config": ["audit", "{d}/images"],
    "eval --data a file": E + ["--data", "{d}/plain.safetensors"],
    "eval --limit 0": E + ["--data", "{d}/images", "--limit", "0"],
    "eval --limit -1": E + ["--data", "{d}/images", "--limit", "-1"],
    "eval --workers -1": E + ["--data", "{d}/images", "--workers", "-1"],
    "eval --methods 'evit:'": E[:-2] + ["--data", "{d}/images", "--methods", "evit:"],
    "eval --methods ':'": E[:-2] + ["--data", "{d}/images", "--methods", ":"],
    "eval --methods 'evit:fuse'": E[:-2] + ["--data", "{d}/images", "--methods", "evit:fuse"],
    "eval --methods evit evit (twice)": E[:-2] + ["--data", "{d}/images", "--methods", "evit", "evit"],
    "eval --labels missing file": E + ["--data", "{d}/images", "--labels", "{d}/none.csv"],
    "eval --class-map a folder": E + ["--data", "{d}/images", "--class-map", "{d}/images"],
    "finetune --steps 0": TUNE + ["--img-size", "32", "--steps", "0"],
    "finetune --resume a plain file": TUNE + ["--steps", "1", "--resume", "{d}/plain.safetensors", "--out", "{d}/o.st"],
    "finetune --save-every without --out": TUNE + ["--steps", "1", "--save-every", "1"],
    "finetune --recipe unknown": TUNE + ["--recipe", "nope"],
    "finetune --accum-steps 0": TUNE + ["--accum-steps", "0"],
    "finetune --ema-decay 1.5": TUNE + ["--ema-decay", "1.5"],
    "finetune a stray word after a switch (--freeze-prefix zzz)": TUNE + ["--freeze-prefix", "zzz", "--steps", "1"],
    "explain --out is a file": [
        "explain",
        MODEL,
        "--no-pretrained",
        "{d}/images/0.png",
        "--out",
        "{d}/plain.safetensors",
    ],
    "explain method without scores (tome)": [
        "explain",
        MODEL,
        "--no-pretrained",
        "{d}/images/0.png",
        "--out",
        "{d}/maps",
        "--method",
        "tome",
    ],
}.items():
    PROBES["cli " + name] = (lambda a: lambda: cli(a))(argv)


# odd images through eval
def odd_images(kind):
    f = D / ("odd_" + kind)
    shutil.rmtree(f, ignore_errors=True)
    f.mkdir()
    png(f / "ok.png")
    if kind == "1x1":
        png(f / "a.png", (1, 1))
    if kind == "16-bit grey":
        Image.fromarray(np.full((40, 40), 60000, dtype=np.uint16)).save(f / "a.png")
    if kind == "CMYK jpeg":
        png(f / "a.jpg", mode="CMYK")
    if kind == "RGBA":
        png(f / "a.png", mode="RGBA")
    if kind == "animated gif":
        frames = [Image.new("P", (40, 40), i) for i in range(3)]
        frames[0].save(f / "a.gif", save_all=True, append_images=frames[1:])
    if kind == "bomb header":
        Image.new("1", (30000, 30000)).save(f / "a.png")
    if kind == "symlink to dev-zero":
        os.symlink("/dev/zero", f / "a.png")
    if kind == "newline in name":
        png(f / "a\nb.png")
    if kind == "labels with BOM":
        (f / "labels.csv").write_text("\ufefffile,class_index\nok.png,3\n", encoding="utf-8")
    if kind == "labels header only":
        (f / "labels.csv").write_text("file,class_index\n")
    if kind == "labels naming a missing file":
        (f / "labels.csv").write_text("file,class_index\nok.png,3\nghost.png,4\n")
    if kind == "labels negative class":
        (f / "labels.csv").write_text("file,class_index\nok.png,-3\n")
    return cli(
        ["eval", MODEL, "--no-pretrained", "--img-size", "32", "--methods", "evit", "--data", str(f), "--json", "-q"]
    )


for kind in [
    "1x1",
    "16-bit grey",
    "CMYK jpeg",
    "RGBA",
    "animated gif",
    "bomb header",
    "symlink to dev-zero",
    "newline in name",
    "labels with BOM",
    "labels header only",
    "labels naming a missing file",
    "labels negative class",
]:
    PROBES["eval images: " + kind] = (lambda k: lambda: odd_images(k))(kind)


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    wanted = [a for a in argv if a != "--markdown"]
    rows = [(name, *probe()) for name, probe in PROBES.items() if not wanted or any(w in name for w in wanted)]
    shutil.rmtree(D, ignore_errors=True)
    if markdown:
        print("| input | outcome | verdict |\n| --- | --- | --- |")
    for name, outcome, sound in rows:
        verdict = "ok" if sound else "FAIL"
        print(
            f"| {name} | {outcome.replace('|', '/')} | {verdict} |"
            if markdown
            else f"{verdict:4s}  {name:50s}  {outcome}"
        )
    print(f"{len(rows)} inputs, {sum(not s for _, _, s in rows)} failed", file=sys.stderr)
    return 1 if any(not s for _, _, s in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
