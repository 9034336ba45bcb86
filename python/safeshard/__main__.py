"""``python -m safeshard``: the same command line as the ``safeshard`` script."""

from ._cli import main

main()
