"""dpbench: benchmark DP fine-tuning and DP compression of language models under one accountant."""
__version__ = "0.1.0"
