"""Print a resolved configuration as YAML (defaults < config file < --set overrides)."""

from __future__ import annotations

import argparse

import yaml

from cxrloc.config import available_configs, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help=f"shipped name ({', '.join(available_configs()) or 'none yet'}) or YAML path; default: built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=1e-4 (repeatable)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
