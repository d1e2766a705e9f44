"""Settings shared by the tutorials: quick mode, the data folder (or its absence) and the figure folder.

``PYRO_SCMODELS_QUICK=1`` runs the quick versions; ``PYRO_SCMODELS_DATA`` overrides the data folder
(point it at a missing one to try the simulator fallback). The data folder is ``../shared/data``
beside the repository; when it is absent the tutorials use the package simulator.
"""

import os
from pathlib import Path

QUICK = os.environ.get("PYRO_SCMODELS_QUICK", "0") == "1"
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PYRO_SCMODELS_DATA", ROOT.parent / "shared" / "data"))
FIGURES = ROOT / "tutorials" / "figures"
FIGURES.mkdir(parents=True, exist_ok=True)
