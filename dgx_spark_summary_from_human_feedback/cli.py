"""Entry points: parse a dataclass config with tyro and turn user errors into one line."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import datasets
import transformers
import tyro

from .errors import InputError
from .hub import check_push_target

C = TypeVar("C")


def parse(config_cls: type[C], args: list[str] | None = None, presets: dict[str, dict] | None = None) -> C:
    """tyro CLI where `--preset NAME` swaps in that preset's defaults; explicit flags still win."""
    args = list(sys.argv[1:] if args is None else args)
    default = None
    if presets and "--preset" in args:
        i = args.index("--preset")
        name = args[i + 1] if i + 1 < len(args) else ""
        plain = getattr(config_cls, "preset", None)  # the field's default (e.g. spark): the Config defaults themselves
        if name not in presets and name != plain:
            sys.exit(f"error: --preset must be one of {sorted([*presets, *([plain] if plain else [])])}")
        default = config_cls(**presets[name]) if name in presets else None
    return tyro.cli(config_cls, args=args, default=default)


def run(
    main: Callable[[C], object],
    config_cls: type[C],
    args: list[str] | None = None,
    presets: dict[str, dict] | None = None,
) -> None:
    """`main(parse(config_cls))`; an InputError exits with its one-line message, no traceback."""
    cfg = parse(config_cls, args, presets)
    datasets.disable_progress_bars()  # our own summaries say what happened; keep the output readable
    transformers.utils.logging.disable_progress_bar()
    try:
        if getattr(cfg, "push_to_hub", None):
            # before the work: hours of it must not end in a push that cannot succeed
            check_push_target(cfg.push_to_hub)
        main(cfg)
    except InputError as e:
        sys.exit(f"error: {e}")
