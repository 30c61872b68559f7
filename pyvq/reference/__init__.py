"""Plain-PyTorch twins of every pyvq op.

They are the oracle in tests, the baseline in benchmarks, and the path every
op takes under ``PYVQ_BACKEND=reference`` or where no kernel exists.
"""

from pyvq.reference.codebook import nearest_code
from pyvq.reference.grid import grid_encode

__all__ = ["grid_encode", "nearest_code"]
