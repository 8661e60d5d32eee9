"""The ``cxrloc`` command line: one subcommand per stage of the pipeline.

Each subcommand lives in ``cxrloc/commands/<name>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; :data:`COMMANDS` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cxrloc import __version__
from cxrloc.malloc import tune_cpu_malloc

#: subcommand name -> (module under cxrloc.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("config", "print a resolved config (shipped name or YAML file, with --set overrides)"),
    "synth": ("synth", "write a synthetic chest X-ray dataset in the ChestX-ray14 layout (known labels and boxes)"),
    "prepare": ("prepare", "validate a ChestX-ray14 folder and build the resized image cache (resumable)"),
    "train": ("train", "train a paper variant on a prepared cache (checkpoints, logs, --resume)"),
    "evaluate": ("evaluate", "score a checkpoint on a cache split: AUC with CIs, box accuracy at IoU T, reports"),
    "compare": ("compare", "put evaluated runs side by side (Table 1 / Table 3 layouts) with paired bootstrap differences"),
    "predict": ("predict", "run a checkpoint on image files/folders/DICOMs: probabilities, boxes, heatmap overlays"),
    "export": ("export", "export a checkpoint to ONNX (pixels -> probabilities and maps), verified with onnxruntime"),
    "demo": ("demo", "the whole method end to end on synthetic X-rays in minutes: synth, prepare, train, evaluate, predict, report"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with ``command``'s arguments; only that command's module is imported, so
    ``cxrloc prepare`` or ``cxrloc --help`` never pay for the torch/lightning imports of other commands."""
    parser = argparse.ArgumentParser(prog="cxrloc", description="DLRV chest X-ray disease identification and localization")
    parser.add_argument("--version", action="version", version=f"cxrloc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        mod = importlib.import_module(f"cxrloc.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # global options take no values
    parser = build_parser(command)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    tune_cpu_malloc()  # large CPU tensors reuse freed memory instead of page-faulting fresh mmaps (cxrloc/malloc.py)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # user-facing errors: one clear line, no traceback
        if args.verbose >= 2:
            raise
        print(f"cxrloc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
