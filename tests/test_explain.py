"""tokenpatch.explain: maps over the patch grid, attention baselines, PNG rendering and the CLI."""

import json

import pytest
import torch
import torchvision
from PIL import Image

import tokenpatch
from tokenpatch.cli import main
from tokenpatch.errors import NotPatchedError, TokenPatchError
from tokenpatch.core.method import Method
from tokenpatch.core.registry import get_method
from tokenpatch.interpret.explanation import (attention_maps, attention_rollout, cls_attention_map, curve_auc, deletion_curve,
                                               explain, insertion_curve, score_map)
from tokenpatch.data import class_description
from tokenpatch.interpret.render import LABEL_HEIGHT, RAMP, colour, colour_bar, contact_sheet, merged, panel, to_pixels

from conftest import METHOD_CASES, images, make_model

@pytest.mark.parametrize("method, options", METHOD_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_maps_have_the_grid_shape_and_their_counts_match_the_trace(method, options):
    model = tokenpatch.patch(make_model("deit_tiny", depth=4, img_size=96), method, keep_ratio=0.5, **options)
    x = images(model, batch=3)
    explanation = explain(model, x)
    assert explanation.computed.shape == (3, 4, 6, 6) and explanation.grid == (6, 6)
    with tokenpatch.trace(model) as t:
        model(x)
    for block, record in enumerate(t.records):
        real = record.counts - 1 if record.counts is not None else torch.full((3,), (record.positions[0] >= 1).sum())
        assert explanation.computed[:, block].flatten(1).sum(dim=1).tolist() == real.tolist()
    assert explanation.importance().shape == (3, 6, 6)
    # a method that restores merged tokens to their patches traces which token carries each patch
    merging = type(get_method(method)).restore_grid is not Method.restore_grid
    assert explanation.scores and explanation.score_name is not None or merging or method == "dynamicvit"
    assert (explanation.groups is not None) == merging


def test_tome_merge_groups_partition_the_patches_like_the_trace():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4, img_size=96), "tome", r=5)
    x = images(model, batch=2)
    explanation = explain(model, x)
    with tokenpatch.trace(model) as t:
        model(x)
    assert explanation.groups.shape == (2, 4, 6, 6)
    for block, record in enumerate(t.records):
        for b in range(2):
            assert len(explanation.groups[b, block].unique()) == record.mlp_tokens - 1 == 36 - 5 * (block + 1)
            assert torch.equal(explanation.groups[b, block].flatten(), record.groups[b])
    # once merged, patches stay together: a later block's groups are unions of earlier ones
    earlier, later = explanation.groups[:, 1].flatten(1), explanation.groups[:, 2].flatten(1)
    same_before = earlier.unsqueeze(2) == earlier.unsqueeze(1)
    assert (same_before <= (later.unsqueeze(2) == later.unsqueeze(1))).all()
    pixels = to_pixels(x[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tile = merged(pixels, explanation.groups[0, -1])
    assert tile.shape == pixels.shape
    assert panel(pixels, explanation, 0).width > 4 * 96  # input and merge maps


def test_iared2_keep_probabilities_cover_the_patches_each_group_saw():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "iared2", keep_ratio=0.5)
    explanation = explain(model, images(model, batch=2))
    assert explanation.score_name == "keep_probability" and sorted(explanation.scores) == [0, 1, 2, 3]
    assert not explanation.scores[0].isnan().any()  # the first group scores every patch
    for block in (1, 2, 3):  # later groups score what the previous block computed
        seen = ~explanation.scores[block].isnan()
        assert torch.equal(seen, explanation.computed[:, block - 1])
    importance = explanation.importance()
    kept_last = explanation.computed[:, -1]
    assert (importance[kept_last].min() > importance[~explanation.computed[:, 0]].max())


def test_score_map_scores_every_patch_in_every_group_and_restores_the_options():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "iared2", keep_ratio=0.5, threshold=0.6)
    x = images(model, batch=2)
    before = tokenpatch.get_config(model)
    heatmap = score_map(model, x)
    assert heatmap.shape == (2, 4, 4) and not heatmap.isnan().any()
    assert ((0 < heatmap) & (heatmap < 1)).all()
    assert tokenpatch.get_config(model) == before
    first = explain(model, x).scores[0]  # the first group sees every patch either way
    assert not torch.allclose(heatmap, first)
    with pytest.raises(TokenPatchError, match="'evit' has no per-patch score map; methods with one: iared2"):
        score_map(tokenpatch.patch(make_model("deit_tiny"), "evit"), x)


def test_importance_ranks_longer_kept_patches_higher():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "evit", keep_ratio=0.5)
    explanation = explain(model, images(model, batch=2))
    importance, blocks = explanation.importance(), explanation.computed.sum(dim=1)
    later, earlier = blocks.flatten(1).unsqueeze(2), blocks.flatten(1).unsqueeze(1)
    flat = importance.flatten(1)
    assert ((flat.unsqueeze(2) > flat.unsqueeze(1)) | ~(later > earlier)).all()


def test_explain_needs_a_patched_model_and_baselines_an_unpatched_one():
    model = make_model("deit_tiny")
    with pytest.raises(NotPatchedError):
        explain(model, images(model))
    tokenpatch.patch(model, "idle")
    with pytest.raises(TokenPatchError, match="unpatched"):
        attention_maps(model, images(model))


def test_rollout_of_one_block_is_half_its_class_attention():
    model = make_model("deit_tiny", depth=1)
    x = images(model, batch=2)
    maps = attention_maps(model, x)
    assert maps.shape == (2, 1, 17, 17)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(2, 1, 17), atol=1e-5)
    assert torch.allclose(attention_rollout(model, x), 0.5 * cls_attention_map(model, x), atol=1e-6)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    return torchvision.transforms.functional.gaussian_blur(x, kernel_size=11, sigma=5.0)


@pytest.mark.parametrize("curve_of, start, end", [(deletion_curve, lambda x: x, torch.zeros_like),
                                                  (insertion_curve, _blurred, lambda x: x)],
                         ids=["deletion: from the image to a blank one", "insertion: from a blurred copy to the image"])
def test_curves_follow_the_predicted_class_from_their_start_to_their_end_image(curve_of, start, end):
    model = make_model("deit_tiny")
    x = images(model, batch=3)
    curve = curve_of(model, x, torch.rand(3, 4, 4), steps=4)
    assert curve.shape == (3, 5)
    predicted = model(x).argmax(dim=1, keepdim=True)
    assert torch.allclose(curve[:, 0], model(start(x)).softmax(dim=1).gather(1, predicted).squeeze(1), atol=1e-6)
    assert torch.allclose(curve[:, -1], model(end(x)).softmax(dim=1).gather(1, predicted).squeeze(1), atol=1e-6)
    assert not torch.allclose(curve[:, 1], curve[:, 0])
    auc = curve_auc(curve)
    assert auc.shape == (3,) and ((0 <= auc) & (auc <= 1)).all()
    assert curve_auc(torch.ones(1, 5)).item() == pytest.approx(1.0)


def test_insertion_restores_the_patches_in_order_of_importance():
    model = make_model("deit_tiny")
    x = images(model, batch=1)
    importance = torch.arange(16.0).view(1, 4, 4)  # the last patch is the most important
    curve = insertion_curve(model, x, importance, steps=16)
    first = _blurred(x)
    first[..., 48:, 48:] = x[..., 48:, 48:]  # 64 px images, 16 px patches: the bottom-right one
    predicted = model(x).argmax(dim=1)
    expected = model(first).softmax(dim=1)[0, predicted]
    assert torch.allclose(curve[:, 1], expected, atol=1e-6)


def test_rendered_panels_grey_dropped_patches_and_colour_scores():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "evit", keep_ratio=0.5)
    x = images(model, batch=2)
    explanation = explain(model, x)
    pixels = to_pixels(x[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert pixels.shape == (64, 64, 3) and 0 <= pixels.min() and pixels.max() <= 255
    picture = panel(pixels, explanation, 0)
    assert picture.height > 64 and picture.width > 3 * 64
    sheet = contact_sheet([picture, panel(pixels, explanation, 1)])
    assert sheet.height > 2 * picture.height
    rgb = colour(torch.tensor([[0.0, float("nan")], [1.0, 0.5]]))
    assert rgb[0, 0].tolist() != rgb[1, 0].tolist() and rgb[0, 1].tolist() == [40.0, 40.0, 40.0]


@pytest.mark.parametrize("method, expected", [("iared2", '"score_name": "keep_probability"'), ("tome", '"merged": true')])
def test_cli_writes_valid_pngs(tmp_path, capsys, method, expected):
    files = []
    for i, shade in enumerate((30, 200)):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (80, 60), (shade, 100, 50)).save(path)
        files.append(str(path))
    out = tmp_path / "maps"
    code = main(["explain", "deit_tiny_patch16_224", "--no-pretrained", *files, "--method", method, "--keep-ratio", "0.6",
                 "--out", str(out), "--json"])
    assert code == 0
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == ["000_img0.png", "001_img1.png", "contact_sheet.png"]
    for path in written:
        with Image.open(path) as image:
            image.verify()
    out = capsys.readouterr().out
    assert expected in out
    predicted = json.loads(out)["predicted"]  # the patched model's top class, in words, per image
    assert len(predicted) == 2 and all(p["class"] == class_description(p["class_index"], 1000) for p in predicted)
    assert all(0 < p["probability"] <= 1 for p in predicted)


def test_class_descriptions_name_imagenet_classes_and_number_the_others():
    assert class_description(281, 1000) == "tabby, tabby cat"
    assert class_description(3, 10) == "class 3"


def test_score_panels_end_with_a_colour_bar_high_at_the_top():
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "evit", keep_ratio=0.5)
    x = images(model, batch=1)
    pixels = to_pixels(x[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    picture = panel(pixels, explain(model, x), 0, caption="tabby (80%)")
    bar = colour_bar(64)
    assert picture.width == panel(pixels, explain(model, x), 0).width and bar.height == picture.height
    column = [bar.getpixel((5, y)) for y in range(LABEL_HEIGHT, LABEL_HEIGHT + 64)]
    assert column[0] == tuple(RAMP[-1].int().tolist()) and column[-1] == tuple(RAMP[0].int().tolist())
    assert picture.crop((picture.width - bar.width, 0, picture.width, picture.height)).tobytes() == bar.tobytes()


def test_cli_explain_names_a_missing_image(tmp_path, capsys):
    assert main(["explain", "deit_tiny_patch16_224", "--no-pretrained", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_the_pareto_figure_labels_every_reached_point_and_leaves_out_unreachable_budgets(tmp_path, monkeypatch):
    import matplotlib.figure

    from tokenpatch.measure.plot import pareto_figure

    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path: drawn.append(self) or real_savefig(self, path))
    rows = [{"method": "tome", "macs_ratio": 0.65, "top1": 76.0}, {"method": "tome", "macs_ratio": 0.5, "top1": 74.0},
            {"method": "ats", "macs_ratio": 0.5, "top1": 70.0},
            {"method": "ats", "macs_ratio": 0.66, "top1": None, "note": "ats can't reach macs_ratio=0.65"}]
    pareto_figure(rows, 77.0, "title", tmp_path / "pareto.png")
    with Image.open(tmp_path / "pareto.png") as image:
        image.verify()
    zoom = drawn[0].axes[1]
    lines = {line.get_label(): list(line.get_xdata()) for line in zoom.get_lines()}
    assert lines["tome"] == [50.0, 65.0, 100.0] and lines["ats"] == [50.0, 100.0]  # no point at the unreached 65 %
    assert sorted(text.get_text() for text in zoom.texts) == ["70.0", "74.0", "76.0"]


def test_the_pareto_figure_labels_close_points_without_overlapping_labels(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from tokenpatch.measure.plot import pareto_figure

    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path: drawn.append(self) or real_savefig(self, path))
    # as in the leaderboard: many methods near one budget, their top-1 within a tenth of a point
    rows = [{"method": f"m{i}", "macs_ratio": 0.65 + 0.002 * i, "top1": 76.0 + 0.1 * (i % 4)} for i in range(8)]
    rows += [{"method": f"m{i}", "macs_ratio": 0.5, "top1": 60.0 + i} for i in range(8)]
    pareto_figure(rows, 77.0, "title", tmp_path / "pareto.png")
    figure = drawn[0]
    renderer = FigureCanvasAgg(figure).get_renderer()  # pyplot closed the figure: draw it again as saved
    for axes in figure.axes:
        boxes = [Text.get_window_extent(text, renderer) for text in axes.texts]  # the words, not the leader line
        assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "no label covers another"
    assert sorted(float(text.get_text()) for text in figure.axes[1].texts) == sorted(
        round(row["top1"], 1) for row in rows if row["top1"] >= 76.0)  # the zoom: within 8 points of 77


def test_an_explanation_keeps_the_logits_of_the_pass_it_explains():
    """What explain ran is what the model predicts: the CLI captions its panels from these, with no second pass."""
    model = tokenpatch.patch(make_model("deit_tiny", depth=4), "evit", keep_ratio=0.5)
    x = images(model, batch=2)
    explanation = explain(model, x)
    with torch.no_grad():
        assert torch.equal(explanation.logits, model(x))
    assert explanation.to_cpu().logits.shape == (2, 10)
