"""Network definitions (PyTorch and Keras) and their per-layer parameter/FLOP tables."""
