"""``python -m sacode COMMAND``: see :mod:`sacode.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
