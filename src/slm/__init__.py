"""slm: small language models on one ordinary machine.

    import slm
    lm = slm.load("path/to/hf-folder")
    print(lm.generate("Once upon a time", max_new_tokens=40))
"""

from .checkpoint.safetensors_io import CheckpointError
from .model.config import REGISTRY, ModelConfig, get_config
from .runtime.lm import LM, load
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["LM", "load", "ModelConfig", "Transformer", "REGISTRY", "get_config", "CheckpointError"]
