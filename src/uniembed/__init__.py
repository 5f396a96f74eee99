"""uniembed: universal image embeddings from frozen backbones, cached features and margin-loss heads."""

__version__ = "0.1.0"
