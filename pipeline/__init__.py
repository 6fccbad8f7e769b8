"""hp-pipe: unsupervised semantic segmentation from a frozen-feature cache."""

__version__ = "0.1.0"
