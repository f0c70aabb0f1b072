"""Entry points: parse a dataclass config with tyro and turn user errors into one line."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import datasets
import tyro

from .data import InputError

C = TypeVar("C")


def run(main: Callable[[C], object], config_cls: type[C], args: list[str] | None = None) -> None:
    """`main(tyro.cli(config_cls))`; an InputError exits with its one-line message, no traceback."""
    cfg = tyro.cli(config_cls, args=args, config=(tyro.conf.FlagConversionOff,))
    datasets.disable_progress_bars()  # our own summaries say what happened; keep the output readable
    try:
        main(cfg)
    except InputError as e:
        sys.exit(f"error: {e}")
