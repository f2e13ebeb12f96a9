"""Data: sources, mixing, chat formatting, tokenization with loss masks, batching."""
