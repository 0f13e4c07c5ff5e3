"""Bridges to other training loops (``peftlab.integrations.hf``: transformers' Trainer and TRL)."""
