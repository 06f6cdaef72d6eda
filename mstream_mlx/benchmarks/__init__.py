# Copyright © 2026 mstream-mlx contributors.
"""Speed measurements, apart from the library they time (docs/benchmarks.md).

* :mod:`.decode`: multi-stream decode and prefill against mlx-lm on the same weights
  (``mstream-mlx bench``);
* :mod:`.reference`: the PyTorch reference decode loop, timed when the caller passes
  the reference implementation in;
* :mod:`.lora`: LoRA training throughput against ``mlx_lm.lora``
  (``python -m mstream_mlx.benchmarks.lora``).
"""
