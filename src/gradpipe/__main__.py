"""`gradpipe` and `python -m gradpipe`: the command line, with a Ctrl-C that lands while
Python imports it given the same one line as one before a command's work began."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # during the imports: click's own handling starts after them
        print("gradpipe: error: interrupted before any work began; nothing was written",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
