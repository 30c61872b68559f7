"""pyvq's ops: kernels with a PyTorch API.

Each op validates its arguments, then runs the kernel registered for the
input's device (``torch.ops.pyvq.<op>``) or, under ``PYVQ_BACKEND=reference``
or where no kernel exists, its twin in ``pyvq.reference``.
"""

from pyvq.ops.codebook import nearest_code
from pyvq.ops.kmeans import kmeans

__all__ = ["nearest_code", "kmeans"]
