"""Where the test suite's time goes: which test ran on which pytest-xdist worker, from when to when.

As a pytest plugin it appends one JSON line per test (worker, test id, start, end) to $SUITE_TIMELINE:

    SUITE_TIMELINE=/tmp/t.jsonl PYTHONPATH=bench PYTEST_ADDOPTS="-p suite_timeline" make test

As a script it prints, per worker, each test file's span (a file runs on one worker: --dist loadfile) and the
longest tests, in seconds from the first test's start; with two timelines, each file's summed time in both:

    python bench/suite_timeline.py /tmp/t.jsonl [/tmp/other.jsonl]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict

_started: dict[str, float] = {}


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and os.environ.get("SUITE_TIMELINE"):  # (the controller reports its workers' tests too: not again)
        with open(os.environ["SUITE_TIMELINE"], "a") as f:
            f.write(json.dumps({"w": worker, "id": nodeid, "start": _started.get(nodeid), "end": time.time()}) + "\n")


def read(path: str) -> list[dict]:
    return [r for r in map(json.loads, open(path)) if r["w"].startswith("gw")]


def per_file(rows: list[dict]) -> Counter:
    out = Counter()
    for r in rows:
        out[r["id"].split("::")[0]] += r["end"] - r["start"]
    return out


def main(paths: list[str]) -> None:
    rows = read(paths[0])
    t0 = min(r["start"] for r in rows)
    by_worker = defaultdict(list)
    for r in rows:
        by_worker[r["w"]].append(r)
    print("| worker | file | from s | to s | seconds |\n|---|---|---|---|---|")
    for w, rs in sorted(by_worker.items()):
        spans = {}
        for r in sorted(rs, key=lambda r: r["start"]):
            f = r["id"].split("::")[0]
            a, b = spans.get(f, (r["start"], r["end"]))
            spans[f] = (min(a, r["start"]), max(b, r["end"]))
        for f, (a, b) in spans.items():
            if b - a >= 8:
                print(f"| {w} | {f} | {a - t0:.0f} | {b - t0:.0f} | {b - a:.0f} |")
        print(f"| {w} | (all its tests, summed) | | {max(r['end'] for r in rs) - t0:.0f} | "
              f"{sum(r['end'] - r['start'] for r in rs):.0f} |")
    print("\n| seconds | test |\n|---|---|")
    for r in sorted(rows, key=lambda r: r["start"] - r["end"])[:12]:
        print(f"| {r['end'] - r['start']:.1f} | {r['id']} |")
    if len(paths) > 1:
        a, b = per_file(rows), per_file(read(paths[1]))
        print(f"\n| file | {paths[0]} | {paths[1]} |\n|---|---|---|")
        print(f"| (all) | {sum(a.values()):.0f} | {sum(b.values()):.0f} |")
        for f in sorted(set(a) | set(b), key=lambda f: -max(a[f], b[f]))[:15]:
            print(f"| {f} | {a[f]:.0f} | {b[f]:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
