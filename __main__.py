"""``python -m deltaprop ...`` runs the `deltaprop` command."""

import sys

from deltaprop.cli import main

sys.exit(main())
