"""pyvq's ops: kernels with a PyTorch API.

Each op validates its arguments, then runs the kernel registered for the
input's device (``torch.ops.pyvq.<op>``) or, under ``PYVQ_BACKEND=reference``
or where no kernel exists, its twin in ``pyvq.reference``.
"""

from pyvq.ops.codebook import nearest_code
from pyvq.ops.grid import grid_encode, level_resolutions
from pyvq.ops.kmeans import kmeans
from pyvq.ops.multigrained_attention import multigrained_attention
from pyvq.ops.posterior import multinomial_kl, multinomial_posterior
from pyvq.ops.window_attention import window_attention

__all__ = ["grid_encode", "kmeans", "level_resolutions", "multigrained_attention", "multinomial_kl",
           "multinomial_posterior", "nearest_code", "window_attention"]
