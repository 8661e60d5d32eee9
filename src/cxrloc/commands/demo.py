"""Run the whole method end to end on synthetic chest X-rays: synth, prepare, train, evaluate, predict, report.

Each stage writes into its own folder under --out; rerunning the same command reuses the
finished stages (an interrupted training run is resumed). The summary table is printed and
written to OUT/report.md and OUT/report.html.

Examples:
    cxrloc demo                      # about 10 minutes on a 2-core laptop CPU
    cxrloc demo --quick              # about 2 minutes, smaller everything (the end-to-end test)
    cxrloc demo --ablation           # also baseline, w/o DL, w/o RV with the same budget (Tables 1 and 3)
    cxrloc demo --seed 3 --difficulty hard --out demo-hard
"""

from __future__ import annotations

import argparse
from pathlib import Path

DIFFICULTIES = ("easy", "medium", "hard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="demo folder (default ./cxrloc-demo, or ./cxrloc-demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="small plan: 900 images of 96 px, short training (about 2 minutes)")
    p.add_argument("--ablation", action="store_true",
                   help="also train baseline, dlrv_no_dl and dlrv_no_rv with the same budget and compare (Tables 1 and 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset and of training (default 0)")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="medium", help="synthetic difficulty (default medium)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores the load average leaves free, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines and the summary only)")


def run(args: argparse.Namespace) -> int:
    from cxrloc.demo import run_demo
    from cxrloc.demo_report import summary_text

    out = args.out or Path("cxrloc-demo-quick" if args.quick else "cxrloc-demo")
    result = run_demo(out, quick=args.quick, ablation=args.ablation, seed=args.seed, difficulty=args.difficulty,
                      threads=args.threads, progress=not args.no_progress, say=lambda s: print(s, flush=True))
    print()
    print(summary_text(result))
    print(f"\nreport: {out / 'report.md'} and {out / 'report.html'}")
    return 0
