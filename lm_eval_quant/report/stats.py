"""Per-sample statistics between two evaluations of the same items: pure functions over numpy
arrays (no torch, no lm_eval).

* :func:`choice_scores` — the score each choice of a multiple-choice item is ranked by, exactly as
  lm-eval ranks it: the summed log-likelihood for ``acc``, the log-likelihood divided by the
  choice's length in characters for ``acc_norm``.
* :func:`log_softmax`, :func:`kl_rows` — KL(p ‖ q) between the softmaxes of two score vectors.
* :func:`flip_stats` — flips / agreement between two runs' predictions, split by correctness.
* :func:`ece`, :func:`brier` — calibration of one run (15 equal-width confidence bins; multi-class
  Brier score).
* :func:`mcnemar_exact` — McNemar's exact test on paired 0/1 outcomes (two-sided binomial test
  on the discordant pairs).
* :func:`paired_bootstrap` — seeded percentile bootstrap CI of the mean paired difference,
  optionally stratified (one stratum per task, the statistic then being the unweighted mean of
  the per-task differences, which is how the report's ``mean`` column averages tasks).
* :func:`percentile` — numpy's linear-interpolation percentile (used for every p99).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: bins of the expected calibration error (Guo et al. 2017 use 15 equal-width bins)
ECE_BINS = 15
#: resamples of the paired bootstrap
BOOTSTRAP_RESAMPLES = 10_000


def choice_scores(lls: Sequence[float], lengths: Sequence[float] | None = None) -> np.ndarray:
    """Scores of one item's choices: ``lls`` as is (``acc``), or ``lls / lengths`` when
    ``lengths`` (characters of each choice, lm-eval's ``acc_norm``) is given."""
    s = np.asarray(lls, dtype=np.float64)
    if lengths is None:
        return s
    ln = np.asarray(lengths, dtype=np.float64)
    if ln.shape != s.shape:
        raise ValueError(f"{len(ln)} choice lengths for {len(s)} log-likelihoods")
    return s / np.where(ln > 0, ln, 1.0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a 1-D or 2-D array (float64, max-shifted)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_from_logprobs(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p ‖ q) = Σ p (log p − log q) for one pair of normalised log-probability vectors
    (terms with p = 0 count 0)."""
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    p = np.exp(logp)
    terms = np.where(p > 0, p * (logp - logq), 0.0)
    return float(max(np.sum(terms), 0.0))


def kl_rows(scores_p: Sequence[Sequence[float]], scores_q: Sequence[Sequence[float]]) -> np.ndarray:
    """Per item KL(softmax(scores_p) ‖ softmax(scores_q)); items may have different numbers of
    choices (a ragged list), but p and q must agree item by item."""
    out = np.empty(len(scores_p), dtype=np.float64)
    for i, (a, b) in enumerate(zip(scores_p, scores_q)):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"item {i}: {a.size} vs {b.size} choices")
        out[i] = kl_from_logprobs(log_softmax(a), log_softmax(b))
    return out


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the largest score, the first on ties (numpy's argmax, which lm-eval uses)."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def flip_stats(correct_ref: Sequence[float], correct_q: Sequence[float],
               pred_ref: Sequence[int], pred_q: Sequence[int]) -> dict:
    """Between a reference run and another run on the same items (aligned arrays):

    * ``flips`` — fraction of items whose predicted choice differs;
    * ``agreement`` = 1 − flips;
    * ``right_to_wrong`` / ``wrong_to_right`` — fraction of items correct in the reference and
      wrong in the other run, and the reverse (a flip between two wrong choices counts in
      neither, so right_to_wrong + wrong_to_right ≤ flips);
    * ``n`` — number of items.
    """
    a = np.asarray(correct_ref, dtype=bool)
    b = np.asarray(correct_q, dtype=bool)
    pa = np.asarray(pred_ref)
    pb = np.asarray(pred_q)
    n = len(a)
    if not (len(b) == len(pa) == len(pb) == n):
        raise ValueError("flip_stats: arrays of different lengths")
    if n == 0:
        return {"n": 0, "flips": None, "agreement": None, "right_to_wrong": None, "wrong_to_right": None}
    flips = float(np.mean(pa != pb))
    return {
        "n": n,
        "flips": flips,
        "agreement": 1.0 - flips,
        "right_to_wrong": float(np.mean(a & ~b)),
        "wrong_to_right": float(np.mean(~a & b)),
    }


def ece(confidence: Sequence[float], correct: Sequence[float], n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error with ``n_bins`` equal-width bins of the confidence (the
    probability of the predicted choice): bins ``[0, 1/M], (1/M, 2/M], …, ((M−1)/M, 1]``;
    ECE = Σ_bins |bin| / n · |accuracy(bin) − mean confidence(bin)|."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    n = len(c)
    if n == 0:
        return None
    idx = np.clip(np.ceil(c * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        k = int(m.sum())
        if k:
            total += k / n * abs(float(y[m].mean()) - float(c[m].mean()))
    return total


def brier(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> float | None:
    """Multi-class Brier score (Brier 1950): mean over items of Σ_k (p_k − 1[k = gold])²;
    0 is perfect, 2 the worst. Items may have different numbers of choices."""
    if len(probs) == 0:
        return None
    tot = 0.0
    for p, g in zip(probs, gold):
        p = np.asarray(p, dtype=np.float64)
        y = np.zeros_like(p)
        y[int(g)] = 1.0
        tot += float(np.sum((p - y) ** 2))
    return tot / len(probs)


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X ≤ k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one rounding)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    num = 0
    c = 1
    for i in range(k + 1):
        if i:
            c = c * (n - i + 1) // i
        num += c
    return num / (1 << n)


def mcnemar_exact(correct_a: Sequence[float], correct_b: Sequence[float]) -> dict:
    """McNemar's exact test on paired 0/1 outcomes of two runs on the same items.

    b = items A got right and B wrong, c = the reverse. Under H0 (equal accuracy) each discordant
    item is A-right with probability 1/2, so p = min(1, 2·P(X ≤ min(b, c))), X ~ Bin(b + c, 1/2)
    (the two-sided exact binomial test; p = 1 when there is no discordant pair)."""
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if len(a) != len(bb):
        raise ValueError("mcnemar_exact: arrays of different lengths")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_cdf_half(min(b, c), n))
    return {"b": b, "c": c, "n": int(len(a)), "p": p}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], strata: Sequence | None = None,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Percentile bootstrap CI of the paired difference mean(a) − mean(b).

    Items are resampled with replacement as pairs (``a[i]`` with ``b[i]``), ``n_resamples``
    times from ``numpy.random.default_rng(seed)``. With ``strata`` (one label per item, e.g. the
    task), each stratum is resampled on its own and the statistic is the unweighted mean over
    strata of the per-stratum mean differences. Returns ``diff`` (on the data), ``lo``, ``hi``
    (the α/2 and 1 − α/2 percentiles), ``n``, ``n_resamples``, ``seed``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired_bootstrap: arrays of different lengths")
    d = a - b
    n = len(d)
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "n": 0, "n_resamples": n_resamples, "seed": seed}
    labels = np.zeros(n, dtype=np.int64) if strata is None else np.unique(
        np.asarray([str(s) for s in strata]), return_inverse=True)[1]
    groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_resamples, dtype=np.float64)
    chunk = max(1, min(n_resamples, 2_000_000 // max(1, max(len(g) for g in groups))))
    for g in groups:
        dg = d[g]
        m = len(dg)
        done = 0
        while done < n_resamples:
            k = min(chunk, n_resamples - done)
            idx = rng.integers(0, m, size=(k, m))
            stats[done:done + k] += dg[idx].mean(axis=1)
            done += k
    stats /= len(groups)
    diff = float(np.mean([d[g].mean() for g in groups]))
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "n": n, "n_resamples": n_resamples,
            "seed": seed}


def percentile(x: Sequence[float], q: float) -> float | None:
    """The q-th percentile with numpy's default (linear interpolation between order statistics)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return None
    return float(np.percentile(x, q))


def fmt_p(p: float | None) -> str:
    """A p-value for a table: 4 significant digits, scientific below 1e-4."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"
