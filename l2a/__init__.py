"""l2a: Learn-to-Ask with a from-scratch GRPO (arXiv 2510.25441)."""
