# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream fine-tuning: datasets, losses and the LoRA/full training loop."""
