"""depop-embed: CLIP-style image, text and multimodal listing embeddings on Spark, published as Delta tables."""

__version__ = "0.1.0"

from depop_embed.config import Config, ConfigError, load  # noqa: E402
from depop_embed.tables import IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE  # noqa: E402

__all__ = ["Config", "ConfigError", "load", "IMAGE_TABLE", "LISTING_TABLE", "TABLES", "TEXT_TABLE", "__version__"]
