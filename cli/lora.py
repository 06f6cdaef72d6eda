# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx lora``: fine-tune a multi-stream model (LoRA, DoRA, QLoRA or full),
with ``mlx_lm.lora``'s flags; flags > YAML (``-c``) > defaults."""

from typing import Optional

import typer

from .common import user_errors


def _weights(text: Optional[str]):
    """``"Output=2,Analytical=0.5"`` -> ``{"Output": 2.0, "Analytical": 0.5}``."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(
                f"expected STREAM=WEIGHT pairs separated by commas, got {part!r}",
                param_hint="--stream-weights",
            )
    return out


def lora(
    model: Optional[str] = typer.Option(
        None, "--model", help="MLX model folder or Hub id."
    ),
    train: Optional[bool] = typer.Option(None, "--train", help="Train."),
    test: Optional[bool] = typer.Option(
        None,
        "--test",
        help="Report the test loss (after training, or of --adapter-path).",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Folder with train.jsonl, valid.jsonl, test.jsonl."
    ),
    fine_tune_type: Optional[str] = typer.Option(
        None, "--fine-tune-type", help="lora, dora or full (default lora)."
    ),
    num_layers: Optional[int] = typer.Option(
        None,
        "--num-layers",
        help="Layers to fine-tune, from the last (default 16; -1: all).",
    ),
    lora_rank: Optional[int] = typer.Option(
        None, "--lora-rank", help="LoRA rank (default 8)."
    ),
    lora_scale: Optional[float] = typer.Option(
        None, "--lora-scale", help="LoRA scale, mlx-lm's (default 20); not alpha."
    ),
    lora_dropout: Optional[float] = typer.Option(
        None, "--lora-dropout", help="LoRA dropout (default 0)."
    ),
    lora_keys: Optional[str] = typer.Option(
        None,
        "--lora-keys",
        help="Comma-separated module keys, e.g. self_attn.q_proj,self_attn.v_proj (default: all linears).",
    ),
    optimizer: Optional[str] = typer.Option(
        None, "--optimizer", help="adamw (default), adam, sgd, adafactor, muon."
    ),
    learning_rate: Optional[float] = typer.Option(
        None, "--learning-rate", help="Peak learning rate (default 1e-5)."
    ),
    lr_schedule: Optional[str] = typer.Option(
        None,
        "--lr-schedule",
        help="cosine (default) or constant; YAML may give an mlx-lm schedule.",
    ),
    warmup: Optional[int] = typer.Option(
        None, "--warmup", help="Linear warmup steps (default 5% of --iters)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Minibatch size (default 4)."
    ),
    iters: Optional[int] = typer.Option(
        None, "--iters", help="Training iterations (default 1000)."
    ),
    grad_accumulation_steps: Optional[int] = typer.Option(
        None,
        "--grad-accumulation-steps",
        help="Batches per optimizer update (default 1).",
    ),
    grad_checkpoint: Optional[bool] = typer.Option(
        None,
        "--grad-checkpoint",
        help="Recompute layer activations in backward to save memory.",
    ),
    max_seq_length: Optional[int] = typer.Option(
        None,
        "--max-seq-length",
        help="Longer examples lose their last timesteps (default 2048).",
    ),
    val_batches: Optional[int] = typer.Option(
        None, "--val-batches", help="Validation batches (default 25; -1: all)."
    ),
    test_batches: Optional[int] = typer.Option(
        None, "--test-batches", help="Test batches (default 500; -1: all)."
    ),
    steps_per_report: Optional[int] = typer.Option(
        None, "--steps-per-report", help="Steps between progress lines (default 10)."
    ),
    steps_per_eval: Optional[int] = typer.Option(
        None, "--steps-per-eval", help="Steps between validations (default 200)."
    ),
    save_every: Optional[int] = typer.Option(
        None, "--save-every", help="Save adapters every N steps (default 100)."
    ),
    adapter_path: Optional[str] = typer.Option(
        None, "--adapter-path", help="Where adapters are saved (default adapters)."
    ),
    resume_adapter_file: Optional[str] = typer.Option(
        None,
        "--resume-adapter-file",
        help="Continue from this adapters.safetensors (exactly, if its training_state.safetensors is beside it).",
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    wait_k: Optional[int] = typer.Option(
        None,
        "--wait-k",
        help="prompt/completion and chat data: the assistant starts K timesteps after the user (default 0).",
    ),
    auditor_wait: Optional[int] = typer.Option(
        None, "--auditor-wait", help="The auditor stream's delay (default: --wait-k)."
    ),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt", help="System message for blocks examples without one."
    ),
    stream_weights: Optional[str] = typer.Option(
        None,
        "--stream-weights",
        help="Per-stream loss weights, e.g. Output=2,Analytical=0.5 (default 1).",
    ),
    long_ce: Optional[bool] = typer.Option(
        None, "--long-ce", help="Long-CE reweighting (paper §5.5)."
    ),
    long_ce_gamma: Optional[float] = typer.Option(
        None, "--long-ce-gamma", help="Long-CE weight cap (default 3)."
    ),
    skip_invalid: Optional[bool] = typer.Option(
        None,
        "--skip-invalid",
        help="Skip malformed data lines (counted) instead of stopping.",
    ),
    config: Optional[str] = typer.Option(
        None, "-c", "--config", help="YAML file with any of these settings (flags win)."
    ),
):
    """Fine-tune a multi-stream model on multi-stream JSONL data."""
    from mstream_mlx.tuner.train import resolve_args, run

    # None = not given, so the YAML (-c) or the default applies (mlx_lm.lora's order)
    flags = {
        "model": model,
        "train": train,
        "test": test,
        "data": data,
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_rank": lora_rank,
        "lora_scale": lora_scale,
        "lora_dropout": lora_dropout,
        "lora_keys": (
            None
            if lora_keys is None
            else [k.strip() for k in lora_keys.split(",") if k.strip()]
        ),
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "lr_schedule": lr_schedule,
        "warmup": warmup,
        "batch_size": batch_size,
        "iters": iters,
        "grad_accumulation_steps": grad_accumulation_steps,
        "grad_checkpoint": grad_checkpoint,
        "max_seq_length": max_seq_length,
        "val_batches": val_batches,
        "test_batches": test_batches,
        "steps_per_report": steps_per_report,
        "steps_per_eval": steps_per_eval,
        "save_every": save_every,
        "adapter_path": adapter_path,
        "resume_adapter_file": resume_adapter_file,
        "seed": seed,
        "wait_k": wait_k,
        "auditor_wait": auditor_wait,
        "system_prompt": system_prompt,
        "stream_weights": _weights(stream_weights),
        "long_ce": long_ce,
        "long_ce_gamma": long_ce_gamma,
        "skip_invalid": skip_invalid,
    }
    with user_errors():
        run(resolve_args(flags, config), log=lambda m: typer.echo(m, err=True))
