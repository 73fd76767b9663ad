"""The command line, ``python -m sacode COMMAND`` (the top layer: it may import every other).

=========  =======================================================================================
verify     every closed-form check of the book (:mod:`sacode.verify`)
train      one fine-tuning run of a preset (:mod:`sacode.cli.train`)
pretrain   rebuild a committed pretrained model from its seed (:mod:`sacode.cli.pretrain`)
bench      the comparisons behind the book's figures and the README's tables (:mod:`sacode.bench`)
=========  =======================================================================================
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"verify": "sacode.verify", "train": "sacode.cli.train", "pretrain": "sacode.cli.pretrain",
            "bench": "sacode.bench"}

USAGE = """usage: python -m sacode {verify,train,pretrain,bench} [options]
  verify   run every closed-form theory check
  train    one fine-tuning run (see python -m sacode train --help; --list shows the presets)
  pretrain reproduce a committed pretrained model (toys, digits, digits-classifier)
  bench    comparisons behind the book's figures (python -m sacode bench --help lists them)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
