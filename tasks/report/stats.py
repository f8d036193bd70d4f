"""Comparing two classifiers on one test set: McNemar's test on the discordant pairs
(Dietterich 1998), a paired bootstrap of the accuracy difference (Raschka 2018,
arXiv:1811.12808), and Welch's t-test across training seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

EXACT_BELOW = 25  # discordant pairs; below this the chi-squared approximation is poor


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's test of "A and B have the same error rate" on paired test examples.

    b = A right and B wrong, c = A wrong and B right. With b + c < 25 the exact two-sided
    binomial test on b out of b + c; otherwise chi-squared with continuity correction,
    (|b - c| - 1)^2 / (b + c), one degree of freedom.
    """
    from scipy import stats

    a, b_ = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired test needs equally many examples, got {a.shape} and {b_.shape}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    n = b + c
    if n == 0:  # the two models agree on every example: no evidence of a difference
        return {
            "b": b,
            "c": c,
            "n": int(a.size),
            "statistic": None,
            "p_value": 1.0,
            "method": "no discordant pairs",
        }
    if n < EXACT_BELOW:
        p = stats.binomtest(b, n, 0.5).pvalue
        return {
            "b": b,
            "c": c,
            "n": int(a.size),
            "statistic": None,
            "p_value": float(p),
            "method": "exact binomial",
        }
    chi2 = (abs(b - c) - 1) ** 2 / n
    return {
        "b": b,
        "c": c,
        "n": int(a.size),
        "statistic": float(chi2),
        "p_value": float(stats.chi2.sf(chi2, df=1)),
        "method": "chi-squared with continuity correction",
    }


def paired_bootstrap(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 100,
) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy(A), accuracy(B) and accuracy(A) - accuracy(B),
    resampling test indices with replacement, the same indices for both models.

    Covers test-set noise only; training noise needs several seeds. Chunked so a 25,000
    example test set does not need an (n_boot x n) index matrix at once.
    """
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"paired bootstrap needs equally many examples (> 0), got {a.shape} and {b.shape}"
        )
    rng = np.random.default_rng(seed)
    acc_a, acc_b = [], []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, a.size, size=(min(chunk, n_boot - start), a.size))
        acc_a.append(a[idx].mean(axis=1))
        acc_b.append(b[idx].mean(axis=1))
    ra, rb = np.concatenate(acc_a), np.concatenate(acc_b)

    def ci(x: np.ndarray) -> list[float]:
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]

    diffs = ra - rb
    # two-sided: how often the resampled difference lands on the other side of zero
    beyond = min(int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0)))
    return {
        "n_boot": n_boot,
        "seed": seed,
        "p_value": min(1.0, 2 * (beyond + 1) / (n_boot + 1)),
        "diff": float(a.mean() - b.mean()),
        "diff_ci95": ci(ra - rb),
        "a_ci95": ci(ra),
        "b_ci95": ci(rb),
    }


def welch(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Welch's t-test (unequal variances) of the seeds' accuracies of two configurations:
    does training noise explain the difference? Needs two seeds or more on each side."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs two seeds or more per side, got {len(a)} and {len(b)}")
    result = stats.ttest_ind(a, b, equal_var=False)
    statistic, p = float(result.statistic), float(result.pvalue)
    if not (np.isfinite(statistic) and np.isfinite(p)):  # no variance on either side
        return {"statistic": None, "p_value": None, "n": [len(a), len(b)]}
    return {"statistic": statistic, "p_value": p, "n": [len(a), len(b)]}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in their order:
    the k-th smallest is multiplied by (m - k + 1), made monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
