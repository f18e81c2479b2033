"""The evaluation metrics: per-class accuracy and confusion matrix (hand-written with bincount to
keep torchmetrics' import out of `evaluate`) agree with torchmetrics; intervals behave."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

from transferkit.evaluation.metrics import classification_metrics, paired_difference, wilson_interval


@pytest.mark.parametrize("k", [2, 5, 10])
def test_classification_metrics_agree_with_torchmetrics(k):
    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (997,), generator=g)
    logits = torch.randn(997, k, generator=g) + 2 * torch.nn.functional.one_hot(labels, k)  # better than chance
    m = classification_metrics(logits, labels, [f"c{i}" for i in range(k)])
    pred = logits.argmax(1)
    assert m["confusion"] == multiclass_confusion_matrix(pred, labels, num_classes=k).tolist()
    assert list(m["per_class"].values()) == [float(a) for a in multiclass_accuracy(pred, labels, num_classes=k,
                                                                                   average=None)]
    assert m["top1"] == pytest.approx(float((pred == labels).float().mean()))
    lo, hi = m["top1_ci95"]
    assert lo < m["top1"] < hi
    # the interval is Wilson's 95% score interval of top-1 over the 997 images, worked here by hand
    p, n, z = m["top1"], 997, 1.959964
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (
        1 + z * z / n)
    assert m["top1_ci95"] == pytest.approx([centre - half, centre + half], abs=1e-6)
    assert m["n_test"] == n


def test_intervals():
    # at 0 and 100%: one-sided, the upper bound z^2 / (n + z^2) (3.7% at n = 100), never the zero width of Wald
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.036994), abs=1e-6)
    assert wilson_interval(100, 100) == pytest.approx((0.963006, 1.0), abs=1e-6)
    d = paired_difference(torch.tensor([1, 1, 0, 1]), torch.tensor([1, 0, 0, 0]))
    assert d["difference"] == 0.5 and d["ci95"][0] < 0.5 < d["ci95"][1] and d["n"] == 4


def test_intervals_match_their_textbook_values():
    """Worked by hand: Wilson's score interval; the paired one is mean +- (1.96 s / sqrt(n) + 1 / n) with the
    unbiased s (here sqrt(1/3)); over seeds, Student's t with n - 1 = 2 degrees of freedom, 4.303."""
    from transferkit.evaluation.metrics import mean_difference

    assert wilson_interval(50, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    assert wilson_interval(90, 100) == pytest.approx((0.825634, 0.944771), abs=1e-6)
    d = paired_difference(torch.tensor([1, 1, 0, 1]), torch.tensor([1, 0, 0, 0]))
    assert d["ci95"] == pytest.approx([0.5 - 0.815793, 0.5 + 0.815793], abs=1e-6)
    m = mean_difference([0.01, 0.03, 0.05])
    assert (m["difference"] == pytest.approx(0.03)
            and m["ci95"] == pytest.approx([0.03 - 0.049687, 0.03 + 0.049687], abs=1e-6))


@pytest.mark.parametrize("a_only, b_only, excludes_zero", [(4, 0, False), (5, 0, False), (7, 1, False),
                                                          (10, 2, True), (30, 10, True)])
def test_the_paired_interval_agrees_with_mcnemars_exact_test(a_only, b_only, excludes_zero):
    """Two models that differ on a handful of 10,000 images: the interval excludes 0 where McNemar's exact test
    (two-sided binomial on the images they differ on: p 0.125, 0.062, 0.070, 0.039, 0.002) finds a difference."""
    a, b = torch.zeros(10_000), torch.zeros(10_000)
    a[:a_only] = 1
    b[a_only:a_only + b_only] = 1
    low, high = paired_difference(a, b)["ci95"]
    assert (low > 0) == excludes_zero and high > 0


def test_t_critical_value_beyond_30_degrees_of_freedom_is_t_not_the_normal():
    """Student's t's 95% quantiles (2.021 at df 40, 2.000 at 60, 1.980 at 120); a df between two
    tabulated ones takes the lower one's larger value, so the interval is never narrower than t's."""
    from transferkit.evaluation.metrics import mean_difference, t95

    assert [round(t95(df), 3) for df in (30, 40, 60, 120)] == [2.042, 2.021, 2.000, 1.980]
    assert t95(50) == t95(40) and t95(1000) == t95(120) > 1.96
    diffs = [0.01 * (i % 5) for i in range(41)]  # 41 seeds: df 40
    m = mean_difference(diffs)
    s = torch.tensor(diffs, dtype=torch.float64).std().item()
    assert m["ci95"][1] - m["difference"] == pytest.approx(2.021 * s / 41 ** 0.5, rel=1e-9)


def test_the_wilson_interval_holds_the_observed_accuracy_and_stays_within_0_and_1():
    """At 0 or 100% the bound on that side is the accuracy itself: unclamped, rounding puts it a hair past it
    (0 of 3 right: a lower bound of 5.6e-17, an interval that excludes the 0% it was computed from)."""
    for n in range(1, 200):
        for correct in range(n + 1):
            lo, hi = wilson_interval(correct, n)
            assert 0.0 <= lo <= correct / n <= hi <= 1.0, (correct, n, lo, hi)
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
