"""Peak memory and time of reading a prompt source and drawing a round's prompts, by format.

    python bench/prompt_memory.py [--rows 100000] [--draw 3000]

Writes the same rows as JSONL, Parquet, an Arrow file and a save_to_disk folder, then, each in a fresh process:
`read_prompts` (every row checked) and `draw_round_prompts`. Parquet and Arrow are run twice: the first load
converts the file into the `datasets` cache (a temporary one here), the second maps that cache. "list" is the
way prompts were read before: every JSONL row parsed into one Python list, then sampled. Memory is the process's
peak resident set (VmHWM, reset after imports, `datasets` included) less its resident set after imports. Raw
results go to bench/results/prompt-memory-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, random, sys, time
import datasets  # imported before the baseline: its ~70 MiB of code are not the rows'
from alignment.prompts import read_prompts
from alignment.stages.generate import draw_round_prompts
kind, path, draw = sys.argv[1], sys.argv[2], int(sys.argv[3])
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
base, t0 = status("VmRSS"), time.time()
if kind == "list":  # as before: the whole file as Python dicts
    rows = [json.loads(line) for line in open(path) if line.strip()]
    t1 = time.time()
    drawn = random.Random("0-round-1").sample(rows, draw)
else:
    rows = read_prompts(path)
    t1 = time.time()
    drawn = draw_round_prompts(rows, draw, 0, 1)
t2 = time.time()
print(json.dumps({"rows": len(rows), "drawn": len(drawn), "first": drawn[0]["prompt_id"], "base_mib": base,
                  "peak_mib": status("VmHWM"), "load_s": t1 - t0, "draw_s": t2 - t1}))
"""


def write_sources(folder: Path, n: int) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"prompt_id": [f"q{i:07d}" for i in range(n)],
                  "messages": [[{"role": "user", "content": f"What is {i} + {i % 97}? Answer with the number."}]
                               for i in range(n)],
                  "answer": [str(i + i % 97) for i in range(n)]})
    pq.write_table(t, folder / "p.parquet")
    with pa.OSFile(str(folder / "p.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    datasets.Dataset(t).save_to_disk(str(folder / "disk"))
    with open(folder / "p.jsonl", "w") as f:
        for r in t.to_pylist():
            f.write(json.dumps(r) + "\n")
    return {"jsonl": folder / "p.jsonl", "parquet": folder / "p.parquet", "arrow": folder / "p.arrow",
            "save_to_disk": folder / "disk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--draw", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_sources(folder, args.rows)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(folder / "c")}
        runs = [("list", "jsonl", "-"), ("read_prompts", "jsonl", "-"), ("read_prompts", "parquet", "first load"),
                ("read_prompts", "parquet", "cached"), ("read_prompts", "arrow", "first load"),
                ("read_prompts", "arrow", "cached"), ("read_prompts", "save_to_disk", "-")]
        results = []
        for how, kind, when in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, "list" if how == "list" else kind, str(files[kind]),
                                  str(args.draw)], env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results.append({"reader": how, "format": kind, "when": when, **r})
    first = {r["first"] for r in results}
    lines = [f"{args.rows} rows, a draw of {args.draw}; this machine (2 cores) was shared with other jobs, so times "
             "vary by run", "", "| reader | format | load | peak RSS over baseline (MiB) | baseline (MiB) | "
             "read + check (s) | draw (s) |", "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['reader']} | {r['format']} | {r['when']} | {r['peak_mib'] - r['base_mib']:.0f} | "
              f"{r['base_mib']:.0f} | {r['load_s']:.2f} | {r['draw_s']:.3f} |" for r in results]
    lines.append(f"\nevery reader drew the same first prompt: {len(first) == 1} ({sorted(first)[0]})")
    print("\n".join(lines))
    out = ROOT / "bench" / "results" / f"prompt-memory-{args.rows}.json"
    out.write_text(json.dumps({"rows": args.rows, "draw": args.draw, "shared_machine": True,
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
