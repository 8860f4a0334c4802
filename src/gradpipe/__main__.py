"""`python -m gradpipe ...`: the same as the `gradpipe` command."""

from .cli import main

main()
