"""Compression: pruning and quantization as pure transforms over Flax parameter trees."""
