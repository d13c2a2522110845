"""mvrec: micro-video features from frozen LVLMs, a Parquet feature store, and the DFF recommender."""

__version__ = "0.1.0"
