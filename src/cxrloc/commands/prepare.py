"""Build the resized image cache from a ChestX-ray14 folder (official download or `cxrloc synth` output).

Validates the folder (strict by default: any problem is an error listing them),
decodes and resizes every usable image in parallel, and writes CACHE/ with
images.npy, index.csv, boxes.csv, report.json and meta.json. Resumable: rerun the
same command after an interruption; a finished cache makes it a no-op.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_SIZE = 256  # same as cxrloc.data.prepare.DEFAULT_SIZE (imported lazily: keeps `cxrloc --help` fast)
DEFAULT_CHUNK = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="dataset folder (Data_Entry_2017*.csv, split lists, images below it)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"side of the cached square images (default {DEFAULT_SIZE})")
    p.add_argument("--workers", type=int, default=None, help=f"decoding processes (default: all cores, here {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()})")
    p.add_argument("--lenient", action="store_true", help="proceed with what is usable instead of failing on validation problems")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train_val patients held out for validation (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level validation split (default 0)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=f"images per task, the unit of resumption (default {DEFAULT_CHUNK})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cxrloc.data.prepare import prepare_cache

    result = prepare_cache(
        args.data_dir,
        args.out,
        size=args.size,
        workers=args.workers,
        lenient=args.lenient,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    cache = result.cache
    if result.up_to_date:
        print(f"{cache.root}: up to date ({len(cache)} images, same source and arguments); nothing to do")
        return 0
    counts = ", ".join(f"{s} {len(cache.indices(s))}" for s in ("train", "val", "test"))
    print(f"{cache.root}: {len(cache)} images of {cache.size}x{cache.size} ({counts}), {len(cache.boxes)} boxes")
    if result.resumed_chunks:
        print(f"resumed an interrupted run ({result.resumed_chunks} chunks were already done)")
    if result.bad_images:
        print(f"skipped {len(result.bad_images)} image(s) that could not be decoded:")
        for msg in result.bad_images[:10]:
            print(f"  - {msg}")
        if len(result.bad_images) > 10:
            print(f"  ... and {len(result.bad_images) - 10} more")
    if result.report is not None and not result.report.ok:
        print(result.report.summary(per_kind=3))
    print(f"report: {cache.root / 'report.json'}")
    return 0
