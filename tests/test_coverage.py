"""The timm coverage report: architectures built on the meta device, verdicts from the backends."""

from tokenpatch.backends.coverage import ISOTROPIC_MODULES, timm_coverage


def test_coverage_counts_accepted_tags_and_names_each_refusal():
    report = timm_coverage(("deit", "naflexvit"), progress=False)
    assert report.tags["deit"] > 0 and report.accepted["deit"] == report.tags["deit"]  # every DeiT is a ViT
    assert report.accepted["naflexvit"] == 0
    assert list(report.refusals) == [r for r in report.refusals if r.startswith("cannot patch NaFlexVit")]
    assert sum(report.refusals.values()) == report.tags["naflexvit"]
    assert report.share == report.tags["deit"] / (report.tags["deit"] + report.tags["naflexvit"])


def test_at_least_95_percent_of_the_isotropic_pretrained_tags_are_accepted():
    report = timm_coverage(ISOTROPIC_MODULES, progress=False)
    assert sum(report.tags.values()) > 400  # timm's registry really was enumerated
    assert report.share >= 0.95, report.refusals
    for module in ("vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos", "vision_transformer_hybrid"):
        assert report.accepted[module] >= 0.95 * report.tags[module], module
