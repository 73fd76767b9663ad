"""``python -m sacode pretrain WHAT``: rebuild a committed pretrained model from its seed."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "toys":
        from ..envs.toys.pretrained import main as toys
        return toys(argv)
    if argv and argv[0] in ("digits", "digits-classifier"):
        from ..envs.digits.pretrain import main as digits_main
        return digits_main(argv)
    print("usage: python -m sacode pretrain toys|digits|digits-classifier", file=sys.stderr)
    return 2
