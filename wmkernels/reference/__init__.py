"""The reference backend: plain PyTorch, readable, and the specification every kernel is tested against."""
