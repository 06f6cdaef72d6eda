# Copyright © 2026 mstream-mlx contributors.
"""The ``mstream-mlx`` command line (installed as ``mstream_mlx.cli``)."""
