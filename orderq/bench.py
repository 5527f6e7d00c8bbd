"""``orderq bench`` (contract §8) — being built."""

from __future__ import annotations

import argparse

from orderq.settings import Settings


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", metavar="FILE")


def main(args: argparse.Namespace, settings: Settings) -> int:
    raise NotImplementedError
