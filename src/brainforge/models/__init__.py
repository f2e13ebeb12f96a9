"""Model loading: the default model, GGUF conversion, quantization and LoRA."""
