"""Plain-PyTorch twins of every pyvq op.

They are the oracle in tests, the baseline in benchmarks, and the path every
op takes under ``PYVQ_BACKEND=reference`` or where no kernel exists.
"""

from pyvq.reference.codebook import nearest_code
from pyvq.reference.grid import grid_encode
from pyvq.reference.kmeans import kmeans
from pyvq.reference.multigrained_attention import multigrained_attention
from pyvq.reference.posterior import multinomial_kl, multinomial_posterior
from pyvq.reference.window_attention import window_attention

__all__ = ["grid_encode", "kmeans", "multigrained_attention", "multinomial_kl", "multinomial_posterior",
           "nearest_code", "window_attention"]
