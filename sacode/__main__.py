"""Command line: ``python -m sacode verify|...`` (contracts in DESIGN.md)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"verify": "sacode.verify", "train": "sacode.train_cli", "pretrain": "sacode.pretrain_cli",
                "bench": "sacode.bench"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m sacode {" + ",".join(commands) + "} [options]\n"
              "  verify   run every closed-form theory check\n"
              "  train    one fine-tuning run (see python -m sacode train --help)\n"
              "  pretrain reproduce a committed pretrained model (toys, digits, digits-classifier)\n"
              "  bench    comparisons behind the book's figures (toy-convergence, discretization, deterministic, digits,\n"
              "           sd-throughput)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
