"""`smptrain-launch [accelerate launch options] -m smptrain.train ...`: `accelerate launch` with an orderly Ctrl-C
(smptrain.training.launcher). Its arguments are accelerate's own, so it parses none itself."""

from __future__ import annotations

import sys

from smptrain.cli import leave


def main(argv: list[str] | None = None) -> None:
    from smptrain.training.launcher import launch

    leave(launch(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # python -m / accelerate launch -m smptrain.commands.launch
    main()
