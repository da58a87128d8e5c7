"""Readers of foreign weight formats (TensorFlow checkpoints, SavedModels) that need no TensorFlow."""
