"""Plain-PyTorch twins of every pyvq op.

They are the oracle in tests, the baseline in benchmarks, and the path every
op takes under ``PYVQ_BACKEND=reference`` or where no kernel exists.
"""

from pyvq.reference.codebook import nearest_code

__all__ = ["nearest_code"]
