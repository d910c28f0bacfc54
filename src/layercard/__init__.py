"""layercard: decide where parameter-efficient adapters go in an LLM, and prove the choice."""

from layercard.errors import LayercardError

__version__ = "0.1.0"
__all__ = ["LayercardError", "__version__"]
