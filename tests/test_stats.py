"""The checks' bounds cover at their nominal level at the default counts: 16 windows, 200 task items."""

import numpy as np
import pytest

from harness import stats

SIMS, CONFIDENCE = 4000, 0.95


def coverage(draw_pair, bound_of, truth) -> float:
    gen = np.random.default_rng(11)
    return float(np.mean([bound_of(*draw_pair(gen)).upper >= truth for _ in range(SIMS)]))


WINDOWS = 16  # eval/default.yaml's max_windows


def window_noise(gen, kind):
    """Per-window differences with mean 0.27 nats and spread 0.04 (RTN w4g64 on WikiText-2, docs/evaluation.md):
    normal (a window averages 2048 tokens), heavy-tailed (Student-t, 3 d.o.f.) or right-skewed (gamma, 0.63)."""
    if kind == "normal":
        return gen.normal(0.27, 0.04, WINDOWS)
    if kind == "heavy":
        return 0.27 + 0.04 * gen.standard_t(3, WINDOWS) / np.sqrt(3)
    return 0.27 + 0.04 * (gen.gamma(10, 1, WINDOWS) - 10) / np.sqrt(10)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_perplexity_bound_covers_at_the_default_windows(kind):
    def pair(gen):
        base = gen.normal(3.1, 0.4, WINDOWS)
        return base, base + window_noise(gen, kind)

    covered = coverage(pair, lambda b, p: stats.ppl_increase_pct(b, p, CONFIDENCE), 100 * np.expm1(0.27))
    assert abs(covered - CONFIDENCE) <= 0.015, covered


def test_right_skewed_windows_undercover_by_a_few_points():
    """The known limit, in docs/evaluation.md: a mean over 16 right-skewed units covers about 93%."""
    covered = coverage(lambda gen: (window_noise(gen, "skewed"),), lambda v: stats.mean_value(v, CONFIDENCE), 0.27)
    assert 0.91 <= covered < CONFIDENCE, covered


def test_kl_bound_covers_at_the_default_windows():
    # KL per window of the same point: mean 0.26, spread 7% of it, no skew to speak of (measured)
    covered = coverage(lambda gen: (gen.normal(0.26, 0.018, WINDOWS),), lambda v: stats.mean_value(v, CONFIDENCE),
                       0.26)
    assert abs(covered - CONFIDENCE) <= 0.015, covered


def test_accuracy_drop_bound_covers_at_the_default_200_items():
    def pair(gen):
        base = (gen.random(200) < 0.6).astype(float)
        point = np.where(gen.random(200) < 0.1, 1 - base, base)  # flips 10%: true drop 0.1 × (0.6 − 0.4)
        return base, point

    covered = coverage(pair, lambda b, p: stats.accuracy_drop(b, p, CONFIDENCE)[0], 0.1 * (0.6 - 0.4))
    assert abs(covered - CONFIDENCE) <= 0.015, covered


def test_the_mean_drop_over_tasks_covers_too():
    def bound(gen):
        drops, diffs = [], []
        for acc in (0.5, 0.7, 0.3):
            base = (gen.random(200) < acc).astype(float)
            point = np.where(gen.random(200) < 0.1, 1 - base, base)
            b, d = stats.accuracy_drop(base, point, CONFIDENCE)
            drops.append(b)
            diffs.append(d)
        return stats.mean_of(drops, diffs, CONFIDENCE)

    truth = np.mean([0.1 * (2 * acc - 1) for acc in (0.5, 0.7, 0.3)])
    gen = np.random.default_rng(5)
    covered = np.mean([bound(gen).upper >= truth for _ in range(2000)])
    assert abs(covered - CONFIDENCE) <= 0.015, covered


def test_the_old_percentile_bootstrap_undercovers_at_8_windows():
    """Why the bound changed: the percentile bootstrap's 95% covered about 91% at 8 windows."""
    gen = np.random.default_rng(3)
    index = stats.draws("windows", 8, 2000, 0)
    hits = []
    for _ in range(1000):
        d = gen.normal(0.27, 0.05, 8)
        hits.append(np.quantile(d[index].mean(axis=1), CONFIDENCE) >= 0.27)
    assert np.mean(hits) < 0.93
