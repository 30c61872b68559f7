"""pyvq's layers: parameters, shapes and the call to an op."""

from pyvq.nn.blocks import AttnBlock, Decoder, Downsample, Encoder, Normalize, ResnetBlock, Upsample
from pyvq.nn.feature_grid import FeatureGrid
from pyvq.nn.mask_decoder import BLEND_MODES, ConditionEncoder, MaskConditionDecoder, mask_guided_blend
from pyvq.nn.partial_conv import PartialConv2d
from pyvq.nn.stylegan import (
    ModulatedConv2d,
    ResidualDiscriminator,
    StyleMLP,
    SynthesisNetwork,
    ToRGB,
)
from pyvq.nn.swin import (
    DropPath,
    NearestUpsample,
    PatchEmbed,
    PatchExpanding,
    PatchMerging,
    SwinBlock,
    SwinMlp,
    SwinStage,
    WindowAttention,
)
from pyvq.nn.unet import UNet
from pyvq.nn.vector_quantizer import QuantizerOutput, VectorQuantizer, code_usage_stats

__all__ = [
    "BLEND_MODES",
    "AttnBlock",
    "ConditionEncoder",
    "Decoder",
    "Downsample",
    "DropPath",
    "Encoder",
    "FeatureGrid",
    "MaskConditionDecoder",
    "ModulatedConv2d",
    "NearestUpsample",
    "Normalize",
    "PartialConv2d",
    "PatchEmbed",
    "PatchExpanding",
    "PatchMerging",
    "QuantizerOutput",
    "ResidualDiscriminator",
    "ResnetBlock",
    "StyleMLP",
    "SwinBlock",
    "SwinMlp",
    "SwinStage",
    "SynthesisNetwork",
    "ToRGB",
    "UNet",
    "Upsample",
    "VectorQuantizer",
    "WindowAttention",
    "code_usage_stats",
    "mask_guided_blend",
]
