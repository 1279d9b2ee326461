"""``python -m falign`` (also what ``torchrun -m falign train ...`` runs)."""

import sys

from falign_cli import main

sys.exit(main())
