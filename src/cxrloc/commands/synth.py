"""Write a synthetic chest X-ray dataset in the ChestX-ray14 layout (images, Data_Entry, BBox_List, split lists).

Same arguments give byte-identical files. The folder is read by `cxrloc prepare`
exactly like the real download; `synth_truth_boxes.csv` adds the true box of
every planted finding.
"""

from __future__ import annotations

import argparse

DIFFICULTY_CHOICES = ("easy", "medium", "hard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="dataset folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--images", type=int, default=3000, help="number of images (default 3000)")
    p.add_argument("--size", type=int, default=256, help="side of the square images in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--difficulty", choices=DIFFICULTY_CHOICES, default="medium",
                   help="finding contrast/size and image noise (default medium)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--bbox-fraction", type=float, default=0.5,
                   help="fraction of test images with a box finding that BBox_List_2017.csv lists (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous synthetic dataset in --out")
    p.add_argument("--examples", metavar="PNG", help="also (or only, without --out) write a grid with one example per finding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.examples:
        raise ValueError("nothing to do: give --out DIR (dataset) and/or --examples PNG (example grid)")
    if args.examples:
        from cxrloc.data.synth.examples import write_example_grid

        path = write_example_grid(args.examples, seed=args.seed, difficulty=args.difficulty)
        print(f"example grid: {path}")
    if args.out:
        from cxrloc.data.synth.generator import generate_dataset

        res = generate_dataset(args.out, args.images, size=args.size, seed=args.seed, difficulty=args.difficulty,
                               workers=args.workers, bbox_fraction=args.bbox_fraction, overwrite=args.overwrite,
                               progress=not args.no_progress)
        n = len(res.jobs)
        n_test = sum(j.split == "test" for j in res.jobs)
        n_normal = sum(not j.kinds for j in res.jobs)
        print(f"{res.root}: {n} images of {args.size}x{args.size} ({args.difficulty}), "
              f"{len({j.patient for j in res.jobs})} patients, train_val {n - n_test} / test {n_test}, "
              f"No Finding {n_normal / n:.0%}, {res.bbox_rows} BBox_List rows; "
              f"{res.seconds:.1f} s ({n / max(res.seconds, 1e-9):.0f} images/s)")
    return 0
