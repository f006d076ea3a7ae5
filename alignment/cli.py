"""`align`: the command behind `make round`, `make validate` and friends.

    align validate recipes/tiny.yaml [key.path=value ...]   # overrides: any key of the recipe
    align round 1 --recipe recipes/tiny.yaml [--force dpo] [key.path=value ...]
    align eval 1 --recipe recipes/tiny.yaml [--force dpo]      # evaluate and gate round 1's checkpoints
    align status --recipe recipes/tiny.yaml                   # done / stale / missing; what each round promoted
    align report --recipe recipes/tiny.yaml                   # runs/<recipe>/report/report.md and plots
    align stats 1 --recipe recipes/tiny.yaml                  # round 1's scoring and selection, filter by filter
    align stage sft --round 1 --recipe recipes/tiny.yaml [key.path=value ...]   # re-run one stage
    align explain [sft | dpo.beta | teacher.engine ...]       # a recipe section's or key's type, default, meaning
    align plan recipes/llama3.1-70b.yaml [key.path=value ...] # GPU memory per stage against the launcher's GPUs
"""

from __future__ import annotations

import argparse
import sys

from alignment import preflight
from alignment.config import InputError, load_recipe
from alignment.round import StageFailed, run_lock, run_round, run_stage, status_table
from alignment.stage_table import STAGES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check a recipe and its prompt files")
    v.add_argument("recipe")
    pl = sub.add_parser("plan", help="GPU memory each stage needs per GPU, against what the launcher gives it")
    pl.add_argument("recipe")
    r = sub.add_parser("round", help="run (or resume) round N")
    e = sub.add_parser("eval", help="evaluate round N's checkpoints and decide which one is promoted")
    st = sub.add_parser("status", help="which stages of which rounds are done, stale or missing, and what each "
                        "round promoted (primary metric, its interval, the gate's evidence)")
    rep = sub.add_parser("report", help="Markdown report and plots across rounds")
    sts = sub.add_parser("stats", help="round N's scoring and selection: scorers, filters, pairs, reward model")
    for p in (r, e, sts):
        p.add_argument("n", type=int)
    for p in (r, e):
        p.add_argument("--force", choices=("dpo", "sft"), help="promote this checkpoint whatever the gate says")
    s = sub.add_parser("stage", help="re-run one stage of a round, even if it is up to date")
    s.add_argument("stage", choices=list(STAGES))
    s.add_argument("--round", type=int, default=1)
    x = sub.add_parser("explain", help="what a recipe key means: type, default and description")
    x.add_argument("key", nargs="?", default="", help="a section (sft), a dotted path (teacher.engine) or a field "
                   "(dpo.beta); none: the top-level keys")
    for p in (r, e, st, rep, sts, s):
        p.add_argument("--recipe", default="recipes/tiny.yaml")
    # Overrides are the leftover key.path=value words, so they may stand before or after the options.
    args, args.overrides = ap.parse_known_args(argv)
    if stray := [a for a in args.overrides if "=" not in a or a.startswith("-")]:
        ap.error(f"unrecognized arguments: {' '.join(stray)} (overrides are written key.path=value)")
    try:
        if args.cmd == "explain":
            from alignment.explain import explain

            print(explain(args.key))
        elif args.cmd == "plan":
            from alignment.memory_plan import format_plan

            print(format_plan(load_recipe(args.recipe, args.overrides)))
        elif args.cmd == "validate":
            checked = preflight.run(args.recipe, args.overrides, "validate")
            print(f"{args.recipe}: ok (recipe {checked.recipe.name!r}; {checked.train} training prompts, "
                  f"{checked.held_out} held out)")
            for note in checked.notes:  # code checks decided outside; what this machine lacks
                print(note)
        else:
            if getattr(args, "force", None):
                args.overrides.append(f"gate.force={args.force}")  # recorded with the other overrides
            checked = preflight.run(args.recipe, args.overrides, args.cmd, getattr(args, "stage", None))
            recipe = checked.recipe
            for note in checked.notes:  # the Hub commits pinned for the run
                print(note)
            if args.cmd in ("round", "eval"):
                run_round(recipe, args.n, recipe_file=args.recipe, overrides=args.overrides,
                          eval_only=args.cmd == "eval")
            elif args.cmd == "status":
                print(status_table(recipe))
            elif args.cmd == "stats":
                from alignment.summary import round_summary

                print(round_summary(recipe, args.n))
            elif args.cmd == "report":
                from alignment.report import write_report  # matplotlib loads only when asked for

                print(f"wrote {write_report(recipe)}")
            else:
                with run_lock(recipe):
                    run_stage(recipe, args.round, args.stage, recipe_file=args.recipe, overrides=args.overrides,
                              force=True)
    except (InputError, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
