"""brainforge: fine-tune a small open language model on the machine you have."""

__version__ = "0.1.0"
