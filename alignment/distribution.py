"""Small summaries every stage reports, so a silent cap or an empty filter shows up in the manifest."""

from __future__ import annotations

import statistics


def distribution(values: list[float]) -> dict:
    """min / mean / quartiles / max of a list; empty lists say so instead of failing."""
    if not values:
        return {"count": 0}
    v = sorted(values)
    # inclusive: quartiles between the min and max (the default, exclusive, put a p25 below the min of two values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"count": len(v), "min": v[0], "p25": q[0], "median": q[1], "p75": q[2], "max": v[-1],
            "mean": statistics.fmean(v)}
