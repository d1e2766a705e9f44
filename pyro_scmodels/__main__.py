"""``python -m pyro_scmodels`` runs the command line."""

import sys

from .cli import main

sys.exit(main())
