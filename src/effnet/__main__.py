"""`python -m effnet` = the `effnet` command."""

from .cli import main

main()
