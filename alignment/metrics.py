"""Evaluation metrics and their noise as plain functions, so each can be checked by hand.

Every interval is 95% unless a caller asks for another level (the gate asks for 1 - alpha, so that each of its
intervals excludes zero exactly when its test rejects). Bootstraps resample prompts with a fixed seed, so the same per-prompt outcomes always give
the same interval and the same gate decision, whoever runs it and wherever the run folder is."""

from __future__ import annotations

from math import comb

import numpy as np

BOOTSTRAP_SEED = 20240723  # fixed: an interval must not move when nothing but the run changes
BOOTSTRAP_RESAMPLES = 10_000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    The chance that at least one of k samples drawn without replacement from the n is correct."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 0 < k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def wins(candidate: list[float], baseline: list[float]) -> list[float]:
    """Per prompt: 1 when the candidate's reward beats the baseline's on the same prompt, 0.5 on a tie, else 0."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("win rate needs two equally long, non-empty lists of per-prompt rewards")
    return [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline)]


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where the candidate's reward beats the baseline's on the same prompt; ties count half."""
    return float(np.mean(wins(candidate, baseline)))


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """95% Wilson score interval of a proportion (no continuity correction); None without trials. Unlike the
    normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1, where small models live."""
    if n == 0:
        return None
    from scipy.stats import binomtest  # here, not at the top: scipy.stats adds 0.7 s to every `align` command

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _bootstrap(values: list[float], confidence: float = 0.95) -> tuple[list[float], np.ndarray]:
    # Percentile rather than scipy's default BCa: BCa is undefined when every value is equal (all prompts solved,
    # or paired differences all zero), which is common here; the percentile interval is then the point itself.
    from scipy.stats import bootstrap

    res = bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=BOOTSTRAP_RESAMPLES,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED), batch=1000)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)], res.bootstrap_distribution


def bootstrap_interval(values: list[float]) -> list[float] | None:
    """95% interval of the mean of per-prompt values, by resampling prompts; None below two prompts."""
    return _bootstrap(values)[0] if len(values) >= 2 else None


def paired_bootstrap(differences: list[float], confidence: float = 0.95) -> tuple[list[float], float]:
    """([lo, hi], p) for the mean of per-prompt differences (candidate - baseline on the same prompt).

    The two-sided p-value is twice the share of resampled means on the far side of zero (capped at 1): it falls
    below 1 - confidence exactly when zero lies outside the percentile interval, so the interval and the test
    agree."""
    if len(differences) < 2:
        return [float(np.mean(differences))] * 2, 1.0
    ci, dist = _bootstrap(differences, confidence)
    return ci, min(1.0, 2 * min(float(np.mean(dist <= 0)), float(np.mean(dist >= 0))))


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the discordant prompts: `better` where only the candidate is right,
    `worse` where only the baseline is. Under "no difference" each discordant prompt is a fair coin."""
    if better + worse == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(better, better + worse, 0.5).pvalue)


def mcnemar_interval(better: int, worse: int, prompts: int, confidence: float = 0.95) -> list[float]:
    """The interval of the accuracy difference (candidate - baseline, per prompt) that inverts McNemar's exact test.

    Given the d = better + worse discordant prompts, `better` is Binomial(d, q) with q the chance that a discordant
    prompt favours the candidate, and the difference is d / prompts * (2q - 1). The Clopper-Pearson interval of q
    at `confidence`, mapped through that line, excludes zero exactly when `mcnemar_exact` < 1 - confidence: the
    exact test's p-value for q = 1/2 is twice its smaller tail, and Clopper-Pearson's bounds are where each tail
    equals (1 - confidence) / 2. No discordant prompt: [0, 0]."""
    if better + worse == 0:
        return [0.0, 0.0]
    from scipy.stats import binomtest

    q = binomtest(better, better + worse).proportion_ci(confidence_level=confidence, method="exact")
    share = (better + worse) / prompts
    return [share * (2 * float(q.low) - 1), share * (2 * float(q.high) - 1)]


def metric_columns(metrics: list[dict]) -> list[str]:
    """The columns of an evaluation table, in reading order, for the `metrics.json` of one or more rounds.
    A metric's interval (`<metric>_ci`) is shown in its metric's cell, not as a column."""
    keys = {k for m in metrics for k in m["input"] if not k.endswith("_ci")}
    return (["accuracy", *sorted(k for k in keys if k.startswith("accuracy/")), "mean_reward"]
            + sorted(k for k in keys if k.startswith("pass@"))
            + ["win_rate_vs_input", "mean_response_tokens", "length_drift_vs_input", "hit_token_limit_share"]
            + sorted(k for k in keys if k.startswith("lm_eval/")))


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def fmt_ci(value, ci) -> str:
    """`0.433 [0.38, 0.49]`: a value with its 95% interval, or the value alone when it has none."""
    return fmt(value) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def fmt_evidence(c: dict | None) -> str:
    """A gate comparison (decision.json) in short: `accuracy +0.033 [-0.010, +0.077] vs input, McNemar exact p=0.16`."""
    if not c or "p_value" not in c:
        return ""
    return (f"{c['metric']} {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] vs {c['against']}, "
            f"{c['test']} p={c['p_value']:.2g}")


def metrics_table(rows: list[tuple[str, dict]], cols: list[str], head: str = "model") -> list[str]:
    """A Markdown table, one row per (label, metrics) and one column per metric, each with its 95% interval where
    `metrics.json` has one: for the terminal and the report."""
    return [f"| {head} | " + " | ".join(cols) + " |", "|---|" + "---|" * (len(cols) + head.count("|"))] + [
        f"| {label} | " + " | ".join(fmt_ci(m.get(c), m.get(f"{c}_ci")) for c in cols) + " |" for label, m in rows]
