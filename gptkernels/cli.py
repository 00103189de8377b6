"""Command line: `gptkernels {info,...}` (also `python -m gptkernels ...`)."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from gptkernels._info import info
    info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptkernels", description="Fast GPT kernels for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension build and which ops use kernels").set_defaults(fn=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
