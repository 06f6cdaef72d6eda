# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx fuse``: merge trained adapters into a model folder.

mlx-lm's ``LoRALinear.fuse``/``DoRALinear.fuse`` do the arithmetic (``W + scale · Bᵀ
Aᵀ``, re-quantized when the base was quantized unless ``dequantize``); the trained
channel embedding is an ordinary parameter and is saved as is.  The folder is written
beside the destination and renamed into place when complete.
"""

from pathlib import Path

from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, load_config, save_config, save_model

from ..utils import load, resolve_model_path


def fuse(
    model_path: str,
    adapter_path: str,
    save_path: str,
    *,
    dequantize: bool = False,
    force: bool = False,
    log=print,
) -> Path:
    """Fuse ``adapter_path`` into ``model_path`` and save an MLX folder.

    Args:
        model_path: the base model folder (or Hub id) the adapters were trained on.
        adapter_path: the folder ``mstream-mlx lora`` wrote.
        save_path: the output folder; it must not exist unless ``force``.
        dequantize: write full-precision weights (for a QLoRA-trained quantized base).
        force: replace an existing ``save_path`` (only once the new one is complete).

    Returns:
        The output folder, loadable with ``mstream_mlx.load``.
    """
    from ..atomic import atomic_folder, check_destination
    from ..folders import check_apart, copy_side_files

    # --force replaces save_path once the new folder is complete, so it must never
    # be (or hold, or sit inside) a folder it reads from
    for source in (Path(model_path).expanduser(), Path(adapter_path)):
        if source.exists():
            check_apart(Path(save_path), source, "--save-path")
    check_destination(Path(save_path), force)  # fail before the slow part
    src = resolve_model_path(model_path)
    log(f"Loading {src} with the adapters of {adapter_path}")
    model, _ = load(str(src), adapter_path=adapter_path)
    fused = [
        (n, m.fuse(dequantize=dequantize))
        for n, m in model.named_modules()
        if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    config = load_config(src)
    # the stream facts the loader worked out (channel count, layout, silence token)
    config.update(
        num_channels=model.args.num_channels, multistream=model.args.multistream
    )
    if dequantize:
        log("Dequantizing model")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    with atomic_folder(Path(save_path), force) as tmp:
        save_model(tmp, model, donate_model=False)
        save_config(config, tmp / "config.json")
        copy_side_files(src, tmp)
    what = f"Fused {len(fused)} adapter layers" if fused else "Applied the fully fine-tuned weights"
    log(f"{what}; saved to {save_path}")
    return Path(save_path)
