from __future__ import annotations

import numpy as np
import pytest

from insitu.attacks.metrics import psnr, roc_summary, ssim, tpr_at_fpr
from insitu.errors import DataError


def test_perfect_and_useless_scores():
    m = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    perfect = roc_summary(np.r_[np.ones(500), np.zeros(500)] + np.linspace(0, 0.1, 1000), m)
    assert perfect.auc == 1.0 and perfect.tpr_at_0_1pct == 1.0
    rng = np.random.default_rng(0)
    noise = roc_summary(rng.normal(size=1000), m)
    assert abs(noise.auc - 0.5) < 0.06 and noise.tpr_at_1pct < 0.05


def test_tpr_at_fpr_never_exceeds_the_fpr_budget():
    m = np.array([1, 0, 1, 0, 1, 0], bool)
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.05])
    # the top non-member (0.8) sits above two members: at FPR 0 only the first member is found;
    # accepting that one false positive, a threshold at 0.2 finds all three
    assert tpr_at_fpr(s, m, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(s, m, 0.3) == pytest.approx(1 / 3)
    assert tpr_at_fpr(s, m, 1 / 3) == pytest.approx(1.0)


def test_one_class_is_refused():
    with pytest.raises(DataError, match="only one class"):
        roc_summary(np.arange(4.0), np.ones(4))


def test_ssim_and_psnr_known_answers():
    rng = np.random.default_rng(1)
    img = rng.uniform(size=(28, 28))
    assert ssim(img, img) == pytest.approx(1.0) and psnr(img, img) == float("inf")
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 0.1)) == pytest.approx(20.0)
    assert ssim(img, rng.uniform(size=(28, 28))) < 0.1
    assert ssim(img, np.clip(img + rng.normal(scale=0.02, size=img.shape), 0, 1)) > 0.9
    # SSIM ignores nothing structural: a flipped image is a different image
    assert ssim(img, img[::-1]) < 0.2


def test_public_namespace_matches_all():
    import insitu.attacks as attacks

    public = {n for n in dir(attacks) if not n.startswith("_") and not isinstance(getattr(attacks, n), type(attacks))}
    assert public == set(attacks.__all__)


def test_auc_interval_covers_chance_for_noise_and_excludes_it_for_signal():
    from insitu.attacks.metrics import auc_interval

    rng = np.random.default_rng(3)
    m = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    lo, hi = auc_interval(rng.normal(size=600), m)
    assert lo < 0.5 < hi and hi - lo < 0.15
    lo, hi = auc_interval(rng.normal(size=600) + 0.5 * m, m)
    assert lo > 0.55
