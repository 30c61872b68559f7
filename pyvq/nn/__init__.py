"""pyvq's layers: parameters, shapes and the call to an op."""

from pyvq.nn.blocks import AttnBlock, Decoder, Downsample, Encoder, Normalize, ResnetBlock, Upsample
from pyvq.nn.vector_quantizer import QuantizerOutput, VectorQuantizer, code_usage_stats

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Normalize",
    "QuantizerOutput",
    "ResnetBlock",
    "Upsample",
    "VectorQuantizer",
    "code_usage_stats",
]
