"""TF-Slim checkpoints: pure-Python TensorBundle reader/writer and the name mapping."""
