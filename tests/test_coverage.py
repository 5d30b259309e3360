"""The timm coverage report: architectures built on the meta device, verdicts from the backends."""

from tokenpatch.backends.coverage import timm_coverage


def test_coverage_counts_accepted_tags_and_names_each_refusal():
    report = timm_coverage(("deit", "beit"), progress=False)
    assert report.tags["deit"] > 0 and report.accepted["deit"] == report.tags["deit"]  # every DeiT is a ViT
    assert report.accepted["beit"] == 0
    assert list(report.refusals) == [r for r in report.refusals if r.startswith("cannot patch Beit")]
    assert sum(report.refusals.values()) == report.tags["beit"]
    assert report.share == report.tags["deit"] / (report.tags["deit"] + report.tags["beit"])
