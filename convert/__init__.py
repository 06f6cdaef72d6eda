# Copyright © 2026 mstream-mlx contributors.
"""Checkpoint converters (installed as ``mstream_mlx.convert``)."""
