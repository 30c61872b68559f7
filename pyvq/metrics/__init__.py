"""Evaluation metrics: PSNR, SSIM, rFID/IS/KID (torch-fidelity), codebook usage."""

from pyvq.metrics.fidelity import fidelity_metrics
from pyvq.metrics.image import psnr, ssim
from pyvq.nn.vector_quantizer import code_usage_stats

__all__ = ["psnr", "ssim", "fidelity_metrics", "code_usage_stats"]
