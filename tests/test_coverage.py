"""The timm coverage report: architectures built on the meta device, verdicts from the backends."""

from tokenpatch.backends.coverage import ISOTROPIC_MODULES, timm_coverage


def test_at_least_95_percent_of_the_isotropic_pretrained_tags_are_accepted_and_refusals_are_named():
    report = timm_coverage(ISOTROPIC_MODULES, progress=False)
    assert sum(report.tags.values()) > 400  # timm's registry really was enumerated
    assert report.share >= 0.95, report.refusals
    for module in ISOTROPIC_MODULES:
        assert report.accepted[module] >= 0.95 * report.tags[module], module
    # every tag is accepted or refused with a reason naming the block it can't patch
    assert sum(report.accepted.values()) + sum(report.refusals.values()) == sum(report.tags.values())
    assert all(reason.startswith("VisionTransformer.blocks[0] is ") for reason in report.refusals)
