# Copyright © 2026 mstream-mlx contributors.
"""What one timed run measured: the record every benchmark (ours, mlx-lm's, the PyTorch
reference's) returns, so their numbers compare field by field."""

from dataclasses import dataclass


@dataclass
class Run:
    """One timed generation: prefill (to the first token) and decode."""

    prompt_tokens: int
    ttft: float  # seconds to the first sampled token (prefill included)
    timesteps: int  # decode timesteps after the first token
    tokens: int  # tokens sampled in those timesteps
    decode_time: float
    peak_memory: float  # GB

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft if self.ttft else 0.0

    @property
    def timesteps_per_sec(self) -> float:
        return self.timesteps / self.decode_time

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.decode_time
