"""effnet: the TF Hub EfficientNet modules (V1 B0-B7, Lite0-4, V2 B0-B3/S/M/L/XL) as faithful PyTorch modules.

Input contract of every model: float RGB images in [0, 1], NCHW, any size; normalization happens inside.
"""

from .errors import CheckpointFormatError, DownloadError, EffnetError, UnknownModelError, WeightsError
from .loading import create, list_models, load, save
from .embed import classify, embed  # noqa: E402  (the verbs; `effnet.embed` the module stays importable by path)

__all__ = [
    "create", "load", "save", "list_models", "embed", "classify",
    "EffnetError", "UnknownModelError", "WeightsError", "CheckpointFormatError", "DownloadError",
]
__version__ = "0.1.0"
