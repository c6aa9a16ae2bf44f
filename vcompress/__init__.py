"""vcompress: compress a fine-tuned causal LLM for an edge device and prove the result."""

__version__ = "0.4.0"
