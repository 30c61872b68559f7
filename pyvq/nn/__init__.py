"""pyvq's layers: parameters, shapes and the call to an op."""

from pyvq.nn.vector_quantizer import QuantizerOutput, VectorQuantizer, code_usage_stats

__all__ = ["QuantizerOutput", "VectorQuantizer", "code_usage_stats"]
