"""Checkpoint files and Hugging Face names: the only place that knows them."""
