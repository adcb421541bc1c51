"""``python -m simulator``: the same as ``imagebatch simulator``."""

from simulator.cli import main

main()
