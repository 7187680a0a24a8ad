"""edge-ds: DeepSeek-architecture models (MLA + sparse MoE) on the device in front of you.

    import edge_ds
    lm = edge_ds.load("path/to/converted-model")   # or load() for the shipped default model
    print(lm.generate("Hello", max_tokens=40).text)
"""

from . import _blas  # noqa: F401  (must run before mlx is imported: see _blas.py)
from .api import ChatSession, Generation, LanguageModel, TextStream, load
from .errors import EdgeDSError
from .generate import GenerationStats

__all__ = ["load", "LanguageModel", "ChatSession", "Generation", "TextStream", "GenerationStats", "EdgeDSError"]
__version__ = "0.1.0"
