# Copyright © 2026 mstream-mlx contributors.
import pytest

from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(model_type, layout, **kw)`` -> folder; built once per session."""
    made = {}

    def get(model_type: str = "qwen3", layout: str = "blocks", **kw):
        key = (model_type, layout, tuple(sorted(kw.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            made[key] = make_checkpoint(folder, model_type, layout, **kw)
        return made[key]

    return get
