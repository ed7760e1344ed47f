"""``python -m vta``: the disassembler and the simulator for tools outside the package."""

import sys

from vta.cli import main

sys.exit(main())
