"""Metrics against hand-computed values on small synthetic inputs."""
import math

import pytest
import torch

from continual_bench.evaluation import metrics as M


def test_clip_alignment_identical_and_orthogonal():
    f = torch.randn(5, 8)
    assert M.clip_image_alignment(f, f * 3.0) == pytest.approx(
        float((torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(f, dim=1).T).mean()))
    one = torch.tensor([[1.0, 0.0]])
    assert M.clip_image_alignment(one, one) == pytest.approx(1.0)
    # all pairs: generated {e1, e2} vs real {e1}: mean of cos = (1 + 0) / 2
    assert M.clip_image_alignment(one, torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)


def test_kid_self_near_zero_and_shift_positive():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = torch.randn(64, 16, generator=g)
    # a set against itself: the unbiased estimator counts the identical pairs in the cross term only,
    # so it is slightly negative, never positive
    assert M.kid(x, x, seed=0) <= 0
    same_dist = M.kid(x, y, seed=0)  # two samples of one distribution: ~0 (x 1e3)
    shifted = M.kid(x, y + 2.0, seed=0)
    assert abs(same_dist) < 0.05 * shifted
    assert M.kid(x, y, seed=1) == M.kid(x, y, seed=1)  # seeded subsets


def test_kid_hand_computed_single_subset():
    # subset_size = n: the unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, computed by hand
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [3.0]])
    k = lambda a, b: (a * b + 1) ** 3
    kxx = k(0, 1) * 2 / 2  # off-diagonal mean
    kyy = k(2, 3) * 2 / 2
    kxy = (k(0, 2) + k(0, 3) + k(1, 2) + k(1, 3)) / 4
    expected = (kxx + kyy - 2 * kxy) * 1e3
    assert M.kid(x, y, seed=0, subsets=3) == pytest.approx(expected)


def test_summarize_R_hand_computed():
    # 3 tasks; oracle accuracy right after learning (diagonal) and after the last task (row 3)
    R = {(1, 1): 0.9, (2, 2): 0.8, (3, 3): 1.0, (3, 1): 0.3, (3, 2): 0.6}
    out = M.summarize_R(R, 3, higher_is_better=True)
    assert out["P"] == pytest.approx((0.9 + 0.8 + 1.0) / 3)
    assert out["A"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert out["F"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    kid = {(1, 1): 10.0, (2, 2): 20.0, (2, 1): 40.0}
    assert M.summarize_R(kid, 2, higher_is_better=False)["F"] == pytest.approx(30.0)  # larger KID later = forgetting


def test_oracle_accuracy():
    assert M.oracle_accuracy(["a", "b", "a", "generic"], "a") == 0.5
    assert math.isnan(M.oracle_accuracy([], "a"))


def test_clip_text_alignment_is_clipscore():
    text = torch.tensor([[1.0, 0.0, 0.0]])
    same = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    assert M.clip_text_alignment(text, same) == pytest.approx(2.5)
    # cos = 0.6 and -0.8 -> max(cos, 0) = 0.6 and 0 -> 2.5 * 0.3 = 0.75
    mixed = torch.tensor([[0.6, 0.8, 0.0], [-0.8, 0.6, 0.0]])
    assert M.clip_text_alignment(text, mixed) == pytest.approx(0.75)


def test_forgetting_sign_larger_is_more_forgetting():
    assert M.forgetting(0.9, 0.6, higher_is_better=True) == pytest.approx(0.3)  # accuracy dropped
    assert M.forgetting(10.0, 25.0, higher_is_better=False) == pytest.approx(15.0)  # distance grew
    assert M.forgetting(0.5, 0.7, higher_is_better=True) == pytest.approx(-0.2)  # improved: negative


def test_kid_with_whole_sets_does_not_depend_on_the_subset_seed():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g) + 0.5
    # subset size = both set sizes: every subset is the whole set, computed once
    assert M.kid(x, y, seed=0) == pytest.approx(M.kid(x, y, seed=123), rel=1e-12)
    # a larger real set: subsets differ by seed
    z = torch.randn(30, 5, generator=g)
    assert M.kid(z, y, seed=0) != M.kid(z, y, seed=123)
