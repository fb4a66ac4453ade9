"""The MEGABYTE model in pure PyTorch: no DeepSpeed, data or training imports."""

from .config import VOCAB_SIZE, MegabyteConfig, StageConfig
from .layers import residual_branch
from .megabyte import (
    GlobalEmbedding,
    Head,
    Megabyte,
    StageBlock,
    StageInput,
    bytes_loss,
    layer_specs,
    tie_local_embedding,
)

__all__ = [
    "VOCAB_SIZE", "MegabyteConfig", "StageConfig", "GlobalEmbedding", "Head", "Megabyte",
    "StageBlock", "StageInput", "bytes_loss", "layer_specs", "residual_branch",
    "tie_local_embedding",
]
