"""Evaluation metrics as plain functions, so each can be checked by hand."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    The chance that at least one of k samples drawn without replacement from the n is correct."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 0 < k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where the candidate's reward beats the baseline's on the same prompt; ties count half."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("win rate needs two equally long, non-empty lists of per-prompt rewards")
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate)


def metric_columns(metrics: list[dict]) -> list[str]:
    """The columns of an evaluation table, in reading order, for the `metrics.json` of one or more rounds."""
    keys = {k for m in metrics for k in m["input"]}
    return (["accuracy", "mean_reward"] + sorted(k for k in keys if k.startswith("pass@"))
            + ["win_rate_vs_input", "mean_response_tokens", "length_drift_vs_input", "hit_token_limit_share"]
            + sorted(k for k in keys if k.startswith("lm_eval/")))


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def metrics_table(rows: list[tuple[str, dict]], cols: list[str], head: str = "model") -> list[str]:
    """A Markdown table, one row per (label, metrics) and one column per metric: for the terminal and the report."""
    return [f"| {head} | " + " | ".join(cols) + " |", "|---|" + "---|" * (len(cols) + head.count("|"))] + [
        f"| {label} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |" for label, m in rows]
