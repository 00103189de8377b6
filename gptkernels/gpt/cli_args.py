"""The command line's building blocks, shared by every command's parser: one-line usage errors,
help that shows each option's default once, range-checked numbers and UTF-8-checked text."""
from __future__ import annotations

import argparse

from gptkernels.gpt import limits
from gptkernels.gpt.device import check_device_name
from gptkernels.gpt.errors import EXIT_USAGE
from gptkernels.gpt.tokenizer import TokenizerError, check_text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the pointer to --help), not the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Help(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h.lower() or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return h
        return f"{h} (default: {d})"


def num(kind: str):
    return limits.arg_type(kind)


def text(s: str) -> str:
    """A text argument: valid UTF-8 (bytes that are not arrive as lone surrogates)."""
    try:
        return check_text("text", s)
    except TokenizerError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def device(s: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (checked while parsing; whether a GPU is there, later)."""
    try:
        return check_device_name(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def window(s: str):
    """--window: W (every layer), or a comma-separated list with one entry per layer; -1 or
    "global": full causal attention. The number of entries is checked against --n-layer later
    (TrainConfig.validate)."""
    def entry(e: str) -> int:
        e = e.strip().lower()
        if e in ("global", "-1"):
            return -1
        if not e.isdigit():
            raise ValueError(e)
        return int(e)

    try:
        parts = [entry(e) for e in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a window W >= 0, -1 or global, or a comma-separated list of "
                                         f"them with one per layer, got {s!r}") from None
    return parts[0] if len(parts) == 1 else parts
