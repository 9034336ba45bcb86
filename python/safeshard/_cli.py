"""The ``safeshard`` console script: the Rust command line, compiled into the extension."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Runs ``safeshard`` with ``sys.argv`` and exits with its status."""
    from ._safeshard import cli_main

    # Behave like the native binary: Ctrl-C ends the process (Python's handler would only
    # set a flag that the Rust code never looks at).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    sys.exit(cli_main(["safeshard", *sys.argv[1:]]))
