"""``python -m devrecd`` = the ``devrecd`` command."""

from devrecd.cli import main

main()
