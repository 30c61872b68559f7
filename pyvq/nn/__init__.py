"""pyvq's layers: parameters, shapes and the call to an op."""

from pyvq.nn.blocks import AttnBlock, Decoder, Downsample, Encoder, Normalize, ResnetBlock, Upsample
from pyvq.nn.partial_conv import PartialConv2d
from pyvq.nn.vector_quantizer import QuantizerOutput, VectorQuantizer, code_usage_stats

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Normalize",
    "PartialConv2d",
    "QuantizerOutput",
    "ResnetBlock",
    "Upsample",
    "VectorQuantizer",
    "code_usage_stats",
]
