"""vlt: variable-length image tokens by learnable global merging, and DiTs on them."""

__version__ = "0.1.0"
