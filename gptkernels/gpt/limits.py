"""The allowed range of every numeric option, in one form for both places that check them: the
command line's parser (argparse types: a bad value is a usage error naming the flag) and the
Python API (TrainConfig.validate, finetune(): UsageError naming the field).

A kind is one of:
  "int"      any integer            "float"    any finite number
  "int>=0"   0, 1, 2, ...           "float>=0" a finite number >= 0
  "int>=1"   1, 2, 3, ...           "float>0"  a finite number > 0
  "[0,1)"    0 <= x < 1             "[0,1]"    0 <= x <= 1         "(0,1]"  0 < x <= 1
"""
from __future__ import annotations

import argparse
import math

from gptkernels.gpt.errors import UsageError

_WHAT = {
    "int": "an integer", "int>=0": "an integer >= 0", "int>=1": "a positive integer",
    "float": "a finite number", "float>=0": "a number >= 0", "float>0": "a number > 0",
    "[0,1)": "a number in [0, 1)", "[0,1]": "a number in [0, 1]", "(0,1]": "a number in (0, 1]",
}


def expected(kind: str) -> str:
    return _WHAT[kind]


def ok(kind: str, v) -> bool:
    """Whether v is an allowed value of this kind (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if kind.startswith("int"):
        if not isinstance(v, int):
            return False
        return kind == "int" or v >= int(kind[-1])
    if not math.isfinite(v):
        return False
    return {"float": True, "float>=0": v >= 0, "float>0": v > 0, "[0,1)": 0 <= v < 1, "[0,1]": 0 <= v <= 1,
            "(0,1]": 0 < v <= 1}[kind]


def check(name: str, kind: str, v, optional: bool = False) -> None:
    """UsageError "<name>: expected <kind>, got <v>" unless v is allowed (or None when optional)."""
    if v is None and optional:
        return
    if not ok(kind, v):
        raise UsageError(f"{name}: expected {expected(kind)}, got {v!r}")


def arg_type(kind: str):
    """An argparse type for this kind: parses the text and checks the range (argparse then names
    the flag: "argument --lr: expected a number > 0, got '0'")."""
    def parse(s: str):
        try:
            v = int(s) if kind.startswith("int") else float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected(kind)}, got {s!r}") from None
        if not ok(kind, v):
            raise argparse.ArgumentTypeError(f"expected {expected(kind)}, got {s!r}")
        return v
    parse.__name__ = expected(kind)  # what argparse says on a failure it words itself
    parse.kind = kind  # (the tests read it to try a value outside every option's range)
    return parse
