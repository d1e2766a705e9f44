"""Transparent huge pages for torch's large CPU tensors, switched on before torch is imported.

torch's CPU allocator backs every allocation of 2 MB or more with transparent huge pages (2 MB pages, one page fault
where 4 KB pages take 512) when the environment variable ``THP_MEM_ALLOC_ENABLE`` is set at its first allocation, so
it must be set before ``import torch``. NDreamer's (codebooks x cells x codes) tensors are 128 MB each, and a fresh
one cost more in page faults than the operation writing it: a pass over the data took 7.8-8.0 s with huge pages
against 10.2-10.9 s without (benchmarks/RESULTS.md, "NDreamer training: what changed it").

Nothing changes where torch was imported first, on systems without transparent huge pages, or when the user has set
the variable (``THP_MEM_ALLOC_ENABLE=0`` turns it off).
"""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages_for_torch() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless torch is already imported or the variable is set.

    Returns
    -------
    bool
        Whether this call set it.
    """
    if "torch" in sys.modules or VARIABLE in os.environ:
        return False
    os.environ[VARIABLE] = "1"
    return True
