# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx lora``: LoRA, DoRA, QLoRA and full fine-tuning on multi-stream data.

This is glue around mlx-lm's tuner, not a second training loop: ``trainer.train`` and
``trainer.evaluate`` run with our ``loss=`` (:class:`.losses.StreamLoss`) and
``iterate_batches=`` (:class:`.batching.BatchIterator`); mlx-lm compiles the step,
accumulates gradients and checkpoints layers.  Around it we add what mlx-lm's loop
does not do: atomic saves that include the optimizer state, and a data order and
random state that depend on the step only, so a resumed run continues exactly.
Progress, divergence checks and saves hook in through mlx-lm's own
``training_callback`` and ``iterate_batches``.

Every setting is checked before the model loads (:meth:`LoraArgs.check`): a bad one
is one ``ValueError`` line naming it, and nothing is written.
"""

import contextlib
import dataclasses
import io
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner import trainer as lm_trainer
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import build_schedule, print_trainable_parameters

from ..atomic import atomic_file
from ..heads import trained_heads
from ..streams import BLOCKS
from .adapters import (
    ADAPTER_FILE,
    CONFIG_FILE,
    FINE_TUNE_TYPES,
    check_lora_parameters,
    load_adapter_weights,
    load_adapters,
    load_training_state,
    prepare_model,
    read_adapter_config,
    save_checkpoint,
    trainable_weights,
)
from .batching import DEFAULT_PAD_TO, BatchIterator
from .datasets import DEFAULT_SYSTEM, DataOptions, load_datasets
from .distributed import (
    DEFAULT_TIMEOUT,
    GlobalMeanLoss,
    check_same_start,
    describe,
    guard,
    init_world,
    petting,
)
from .losses import LongCE, StreamLoss

OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
    "muon": optim.Muon,
}

# mlx.optimizers.schedulers that a YAML lr_schedule mapping may name
SCHEDULES = ("cosine_decay", "exponential_decay", "linear_schedule", "step_decay")


@dataclass
class LoraArgs:
    """Every setting of ``mstream-mlx lora`` (flag, YAML key and default in one place;
    flags > YAML > these defaults, as in ``mlx_lm.lora``)."""

    model: Optional[str] = None  # MLX model folder or Hub id
    train: bool = False
    test: bool = False
    data: str = "data"  # folder with train.jsonl / valid.jsonl / test.jsonl
    fine_tune_type: str = "lora"  # lora | dora | full
    num_layers: int = 16  # last N layers get adapters (-1: all; fewer exist: all)
    lora_parameters: Dict[str, Any] = field(
        default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0}
    )
    optimizer: str = "adamw"
    optimizer_config: Dict[str, Any] = field(default_factory=dict)  # {adamw: {...}}
    learning_rate: float = 1e-5
    lr_schedule: Any = "cosine"  # cosine | constant | an mlx-lm schedule dict
    warmup: Optional[int] = None  # warmup steps (default: 5% of iters)
    batch_size: int = 4
    iters: int = 1000
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    max_seq_length: int = 2048
    val_batches: int = 25  # -1: the whole validation set
    test_batches: int = 500
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    resume_adapter_file: Optional[str] = None
    seed: int = 0
    clear_cache_threshold: int = 0
    pad_to: int = DEFAULT_PAD_TO
    # mlx.launch runs: a rank with no finished step for this long exits (0: never)
    dist_timeout: float = DEFAULT_TIMEOUT
    # multi-stream data (None: the value saved with --adapter-path when only
    # testing, else the default noted) and loss
    wait_k: Optional[int] = None  # converted formats: assistant starts K steps later (0)
    auditor_wait: Optional[int] = None  # the auditor's delay (default: wait_k)
    system_prompt: Optional[str] = None  # blocks examples without one (DEFAULT_SYSTEM)
    skip_invalid: bool = False
    stream_weights: Dict[str, float] = field(default_factory=dict)  # {Output: 2.0}
    long_ce: bool = False
    long_ce_gamma: float = 3.0
    long_ce_clamp: bool = False
    long_ce_normalize: bool = True

    def check(self):
        """Raise one ``ValueError`` (``FileNotFoundError`` for a missing resume
        file) for the first wrong or inconsistent setting; reads no model."""
        _check_types(self)
        if self.model is None:
            raise ValueError(
                "No model given: pass --model (or 'model:' in the config)."
            )
        if not (self.train or self.test):
            raise ValueError("Nothing to do: pass --train and/or --test.")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(
                f"Unknown fine-tune type {self.fine_tune_type!r}; expected "
                f"{', '.join(FINE_TUNE_TYPES)}."
            )
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {self.optimizer!r}; expected {', '.join(OPTIMIZERS)}."
            )
        for name in (
            "batch_size",
            "iters",
            "grad_accumulation_steps",
            "save_every",
            "steps_per_report",
            "steps_per_eval",
            "max_seq_length",
            "pad_to",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.save_every % self.grad_accumulation_steps:
            raise ValueError(
                f"save_every ({self.save_every}) must be a multiple of "
                f"grad_accumulation_steps ({self.grad_accumulation_steps}), so every "
                "checkpoint falls after an optimizer update and resumes exactly."
            )
        for name in (
            "wait_k",
            "auditor_wait",
            "dist_timeout",
            "warmup",
            "seed",
            "clear_cache_threshold",
        ):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}.")
        if self.seed >= 2**32:
            raise ValueError(f"seed must be below 2**32, got {self.seed}.")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ValueError(
                f"num_layers must be -1 (all) or >= 1, got {self.num_layers}."
            )
        for name in ("val_batches", "test_batches"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ValueError(f"{name} must be -1 (all) or >= 1, got {v}.")
        if not self.learning_rate > 0:  # also nan
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate}."
            )
        if not self.long_ce_gamma > 0:
            raise ValueError(
                f"long_ce_gamma must be a finite number > 0, got {self.long_ce_gamma}."
            )
        for name, w in self.stream_weights.items():
            number = isinstance(w, (int, float)) and not isinstance(w, bool)
            if not (number and math.isfinite(w) and w >= 0):
                raise ValueError(
                    f"The weight of stream {name!r} must be a number >= 0 (finite), "
                    f"got {w!r}."
                )
        if self.fine_tune_type != "full":
            check_lora_parameters(self.lora_parameters)  # before the slow model load
        build_optimizer(self)  # a bad schedule or optimizer_config fails here
        if self.resume_adapter_file is not None and self.train:
            if not Path(self.resume_adapter_file).is_file():
                raise FileNotFoundError(
                    f"No adapters file at {self.resume_adapter_file} "
                    "(--resume-adapter-file)."
                )

    def data_options(self, saved: Optional[dict] = None) -> DataOptions:
        """How data lines become examples: these settings where given, else the
        ones ``saved`` in an adapter_config.json, else the defaults."""
        saved = saved or {}

        def pick(name, default):
            v = getattr(self, name)
            if v is None:
                v = saved.get(name)
            return default if v is None else v

        return DataOptions(
            pick("wait_k", 0),
            pick("auditor_wait", None),
            pick("system_prompt", DEFAULT_SYSTEM),
            self.skip_invalid,
        )


_KINDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
}


def _field_kind(annotation):
    """``(type, optional)`` of a field annotation (``Any`` -> ``(None, True)``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        return _field_kind(kinds[0])[0], True
    if typing.get_origin(annotation) is dict or annotation is dict:
        return dict, False
    if annotation in _KINDS:
        return annotation, False
    return None, True


def _check_types(args: "LoraArgs"):
    """Every setting has its field's type; numbers are finite."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        kind, optional = _field_kind(f.type)
        if kind is None or (v is None and optional):
            continue
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
        if kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}.")
        if not ok:
            raise ValueError(f"{f.name} must be {_KINDS[kind]}, got {v!r}.")
    _check_finite(args.optimizer_config, "optimizer_config")
    _check_finite(args.lr_schedule, "lr_schedule")


def _check_finite(value, where: str):
    """No nan/inf anywhere inside a nested YAML value."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}.")


def _coerce(f: dataclasses.Field, value):
    # YAML reads "1e-5" as a string; numbers arrive as the field's type.
    kind = f.type if isinstance(f.type, type) else None
    if kind in (int, float) and isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"{f.name} must be {_KINDS[kind]}, got {value!r}.") from None
        if kind is float:
            return x
        if not x.is_integer():
            raise ValueError(f"{f.name} must be an integer, got {value!r}.")
        return int(x)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


LORA_FLAGS = {
    "lora_rank": "rank",
    "lora_scale": "scale",
    "lora_dropout": "dropout",
    "lora_keys": "keys",
}


def _read_yaml(config: str) -> dict:
    import yaml

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {config}.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{config}: invalid YAML ({at}{problem}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{config}: not a UTF-8 text file.") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{config} must hold a YAML mapping of settings.")
    return loaded


def resolve_args(flags: Dict[str, Any], config: Optional[str] = None) -> LoraArgs:
    """Merge command-line flags (None = not given) over a YAML file over defaults.

    ``lora_rank``/``lora_scale``/``lora_dropout``/``lora_keys`` flags override single
    entries of ``lora_parameters``.
    """
    fields = {f.name: f for f in dataclasses.fields(LoraArgs)}
    merged: Dict[str, Any] = {}
    if config:
        loaded = _read_yaml(config)
        unknown = sorted(set(map(str, loaded)) - set(fields))
        if unknown:
            raise ValueError(
                f"Unknown setting(s) in {config}: {', '.join(unknown)}. Valid keys are "
                f"the lora flags with '_' for '-' (e.g. batch_size)."
            )
        merged.update(loaded)
    flags = dict(flags)
    lora_flags = {LORA_FLAGS[k]: flags.pop(k) for k in list(flags) if k in LORA_FLAGS}
    merged.update({k: v for k, v in flags.items() if v is not None})
    lora = merged.get("lora_parameters")
    if lora is not None and not isinstance(lora, dict):
        raise ValueError(
            "lora_parameters must be a mapping (rank, scale, dropout, keys)."
        )
    lora = dict(lora or {})
    lora.update({k: v for k, v in lora_flags.items() if v is not None})
    if "scale" not in lora and "alpha" not in lora:
        lora["scale"] = LoraArgs().lora_parameters["scale"]
    merged["lora_parameters"] = {"rank": 8, "dropout": 0.0, **lora}
    for name in ("optimizer_config", "stream_weights"):
        if merged.get(name) is None:
            merged.pop(name, None)  # YAML `key:` with no value: the default
    args = LoraArgs(**{k: _coerce(fields[k], v) for k, v in merged.items()})
    return args


def build_optimizer(args: LoraArgs):
    """AdamW (or another mlx optimizer) on mlx-lm's ``build_schedule``: linear warmup
    then cosine decay to 0 over the remaining steps by default.  A schedule or
    optimizer config mlx cannot build is one ``ValueError`` naming it."""
    lr = args.learning_rate
    sched = args.lr_schedule
    warmup = args.warmup if args.warmup is not None else args.iters // 20
    if isinstance(sched, dict):
        lr = _schedule(sched)
    elif sched == "cosine":
        lr = build_schedule(
            {
                "name": "cosine_decay",
                "arguments": [lr, max(1, args.iters - warmup), 0.0],
                "warmup": warmup,
            }
        )
    elif sched == "constant":
        if warmup:
            lr = build_schedule(
                {"name": "linear_schedule", "arguments": [lr, lr, 1], "warmup": warmup}
            )
    else:
        raise ValueError(
            f"Unknown lr_schedule {sched!r}; expected cosine, constant or an mlx-lm "
            "schedule mapping {name, arguments, warmup}."
        )
    name = args.optimizer.lower()
    config = args.optimizer_config.get(name, {})
    if not isinstance(config, dict):
        raise ValueError(
            f"optimizer_config.{name} must be a mapping of {name} arguments, got "
            f"{config!r}."
        )
    try:
        return OPTIMIZERS[name](learning_rate=lr, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"optimizer_config.{name} is not valid for {name}: {e}."
        ) from None


def _schedule(sched: dict):
    """mlx-lm's ``build_schedule`` on a YAML mapping, checked first."""
    name = sched.get("name")
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown lr_schedule name {name!r}; expected one of {', '.join(SCHEDULES)}."
        )
    arguments = sched.get("arguments")
    if not isinstance(arguments, list) or not arguments:
        raise ValueError(
            f"lr_schedule needs 'arguments', a list starting with the learning rate "
            f"(got {arguments!r})."
        )
    unknown = set(sched) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise ValueError(
            f"Unknown lr_schedule key(s) {', '.join(sorted(map(str, unknown)))}; "
            "expected name, arguments, warmup, warmup_init."
        )
    try:
        fn = build_schedule(sched)
        lr = fn(mx.array(0))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"lr_schedule {name} cannot be built: {e}.") from None
    if not math.isfinite(lr.item()):
        raise ValueError(f"lr_schedule {name} gives a non-finite learning rate.")
    return fn


class Progress(TrainingCallback):
    """Progress through mlx-lm's ``training_callback`` hook: report lines carry loss,
    lr, it/s, tokens/s (all tokens fed, not only supervised ones), peak memory and
    ETA, with global step numbers on a resumed run.  A rich bar on a terminal
    (``with progress:`` shows it; :meth:`advance` moves it), plain lines otherwise."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        tokens: Callable[[], int] = lambda: 0,
        log=print,
        rich: Optional[bool] = None,
    ):
        self.total, self.start, self.tokens, self.log = total, start, tokens, log
        self.history: List[dict] = []
        self.val_history: List[dict] = []
        self._last_tokens = 0
        self._last_it = 0
        self._bar = None
        if rich is None:
            import sys

            rich = sys.stderr.isatty()
        if rich:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn
            from rich.progress import Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold blue]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(
                "train", total=total, completed=start, status=""
            )
            self.log = self._bar.console.print

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            return self._bar.__exit__(*exc)

    def advance(self):
        """One training step done."""
        if self._bar is not None:
            self._bar.advance(self._task)

    def on_train_loss_report(self, info):
        it = info["iteration"] + self.start
        steps = info["iteration"] - self._last_it
        self._last_it = info["iteration"]
        seconds = steps / info["iterations_per_second"]
        seen = self.tokens()
        tok_s = (seen - self._last_tokens) / seconds
        self._last_tokens = seen
        eta = (self.total - it) / info["iterations_per_second"]
        row = {
            **info,
            "iteration": it,
            "tokens_per_second": tok_s,
            "loss_tokens_per_second": info["tokens_per_second"],
            "eta": eta,
        }
        self.history.append(row)
        status = (
            f"loss {info['train_loss']:.3f} · {tok_s:,.0f} tok/s · "
            f"{info['peak_memory']:.2f} GB"
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=it, status=status)
        self.log(
            f"Iter {it}: Train loss {info['train_loss']:.3f}, "
            f"Learning Rate {info['learning_rate']:.3e}, "
            f"It/sec {info['iterations_per_second']:.3f}, Tokens/sec {tok_s:,.1f}, "
            f"Trained Tokens {info['trained_tokens']}, "
            f"Peak mem {info['peak_memory']:.3f} GB, ETA {_hms(eta)}"
        )

    def on_val_loss_report(self, info):
        it = info["iteration"] + self.start
        self.val_history.append({**info, "iteration": it})
        self.log(
            f"Iter {it}: Val loss {info['val_loss']:.3f}, "
            f"Val took {info['val_time']:.3f}s"
        )


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainingDiverged(ValueError):
    """The loss or the weights became non-finite; the last good adapters are kept."""


class _StopOnNonFinite(TrainingCallback):
    """Ends training with :class:`TrainingDiverged` at the first non-finite reported
    loss, before anything is saved from the diverged weights."""

    def __init__(self, start: int, describe_saved: Callable[[], str]):
        self.start, self.describe_saved = start, describe_saved

    def on_train_loss_report(self, info):
        loss = info["train_loss"]
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"The training loss became {loss} (non-finite) by step "
                f"{info['iteration'] + self.start}"
                f"; stopped, {self.describe_saved()}. Try a lower --learning-rate."
            )


def _all_finite(model) -> bool:
    flags = [mx.all(mx.isfinite(w)) for w in trainable_weights(model).values()]
    return all(f.item() for f in flags)


@contextlib.contextmanager
def _quiet_mlx_lm_console():
    # mlx-lm's train() also draws its own table and bar on stdout (colour codes even
    # into a pipe); ours come through its training_callback hook, so its console
    # stays quiet while it runs.
    from mlx_lm.cli_ui import make_console

    console = make_console()
    saved = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = saved


@contextlib.contextmanager
def _restore_layer_call(model):
    # mlx-lm's grad_checkpoint patches the layer *class*; undo it after training so
    # later models of the same class in this process are unaffected.
    cls = type(model.layers[0])
    saved = cls.__call__
    try:
        yield
    finally:
        cls.__call__ = saved


@contextlib.contextmanager
def _new_folder(folder: Path, make: bool):
    """Make ``folder`` (and missing parents); remove what was made, if still empty,
    when the block fails, so a failed run leaves nothing new behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()] if make else []
    if make:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in made:  # innermost first; stop at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        raise


@dataclass
class RunResult:
    """What :func:`run` did: the report rows, validation and test losses."""

    history: List[dict] = field(default_factory=list)
    val_history: List[dict] = field(default_factory=list)
    test_loss: Optional[float] = None
    adapter_path: Optional[Path] = None


def make_loss(model, args: LoraArgs) -> StreamLoss:
    spec = model.streams
    long_ce = None
    if args.long_ce:
        long_ce = LongCE(args.long_ce_gamma, args.long_ce_clamp, args.long_ce_normalize)
    # §5.5: the self-only pass keeps the system block (channel 0) visible
    context = (0,) if spec.layout == BLOCKS else ()
    return StreamLoss(spec.num_channels, long_ce, context)


def adapter_config(args: LoraArgs, model, heads: Optional[list] = None) -> dict:
    cfg = dataclasses.asdict(args)
    if args.fine_tune_type == "full":
        cfg["lora_parameters"] = None
    opts = args.data_options()
    cfg.update(
        wait_k=opts.wait_k, auditor_wait=opts.auditor_wait, system_prompt=opts.system
    )
    spec = model.streams
    cfg["multistream"] = {**spec.to_config(), "num_channels": spec.num_channels}
    if heads:  # the heads the data trained: loading with the adapters runs them
        cfg["multistream"]["heads"] = heads
    return cfg


def pad_multiple(model, args) -> int:
    """Batch lengths are multiples of ``pad_to`` and, for models whose recurrent
    layers need whole rows (Qwen3.5), of the row width too."""
    return math.lcm(args.pad_to, getattr(model, "tokens_per_row", 1))


def fit_num_layers(args: LoraArgs, layers: int, log=print) -> None:
    """mlx-lm's default ``num_layers`` (16) on a model with fewer layers: train
    them all and say so, instead of failing."""
    if args.num_layers > layers:
        log(
            f"[INFO] The model has {layers} layers, fewer than num_layers "
            f"{args.num_layers}: training all {layers}."
        )
        args.num_layers = layers


def train_model(
    args: LoraArgs, model, train_set, valid_set=None, log=print, training_callback=None
) -> RunResult:
    """Fine-tune ``model`` in place on ``train_set``; write adapters to
    ``args.adapter_path``.  See :class:`LoraArgs` for the settings.

    Under ``mlx.launch`` every rank calls this with the same arguments: each trains
    on its share of every batch, and only rank 0 logs and writes files.

    Raises:
        TrainingDiverged: the loss or the weights became non-finite; the adapters
            saved before stay as they were.
    """
    args.check()
    world = init_world(args.dist_timeout)
    if not world.main:
        log = _silent
    fit_num_layers(args, len(model.layers), log)
    mx.random.seed(args.seed)
    prepare_model(model, args.fine_tune_type, args.num_layers, args.lora_parameters)
    optimizer_name = args.optimizer.lower()
    start, opt_state = 0, None
    if args.resume_adapter_file:
        log(f"Loading fine-tuned weights from {args.resume_adapter_file}")
        load_adapter_weights(
            model, args.resume_adapter_file, args.fine_tune_type == "full"
        )
        saved = load_training_state(args.resume_adapter_file, optimizer_name)
        if saved is None:
            log(
                "[WARNING] No training_state.safetensors next to it: the optimizer and "
                "the data order start afresh (weights only, as mlx-lm resumes)."
            )
        else:
            start, opt_state = saved
            log(f"Resuming at step {start} of {args.iters}.")
    if world.main:  # mlx-lm prints it; it goes where our log lines go
        with contextlib.redirect_stdout(io.StringIO()) as out:
            print_trainable_parameters(model)
        log(out.getvalue().strip())
    folder = Path(args.adapter_path)
    optimizer = build_optimizer(args)
    if opt_state is not None:
        optimizer.state = opt_state
    result = RunResult(adapter_path=folder)
    if start >= args.iters:
        log(f"Nothing to train: the checkpoint is at step {start} of {args.iters}.")
        return result

    batches = BatchIterator(seed=args.seed, pad_to=pad_multiple(model, args), start_step=start)
    heads = trained_heads(model.streams, train_set)
    writer = world.main  # one process writes, as in mlx-lm
    last_saved = [start if args.resume_adapter_file else None]

    def describe_saved() -> str:
        if last_saved[0] is None:
            return "nothing was saved"
        return f"{folder / ADAPTER_FILE} still holds step {last_saved[0]}"

    def check_finite(step: int):
        # every rank holds the same weights, so all ranks stop together
        if not _all_finite(model):
            raise TrainingDiverged(
                f"The weights became non-finite by step {step}; stopped, "
                f"{describe_saved()}. Try a lower --learning-rate."
            )

    def save(step: int, numbered: bool = True):
        save_checkpoint(
            folder,
            model,
            step=step,
            optimizer=optimizer,
            optimizer_name=optimizer_name,
            numbered=numbered,
            config=adapter_config(args, model, heads),
        )
        last_saved[0] = step

    def before_step(done: int):
        # dropout masks depend on (seed, step, rank) only: a resumed run draws the
        # same ones, and ranks draw different ones for their different examples
        mx.random.seed((args.seed * 1_000_003 + done) * world.size + world.rank)
        if done > start:
            ui.advance()
        if done > start and done % args.save_every == 0:
            check_finite(done)
            if writer:
                save(done)
                ui.log(f"Iter {done}: Saved adapter weights to {folder / ADAPTER_FILE}.")

    def iterate(
        dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None
    ):
        gen = batches(dataset, batch_size, max_seq_length, loop, seed, comm_group)
        if not loop:
            yield from gen
            return
        done = start
        for batch in gen:
            before_step(done)
            yield batch
            done += 1

    # tokens of every rank; the report callback runs on all ranks at the same step
    ui = Progress(
        args.iters,
        start,
        lambda: world.all_sum_int(batches.tokens_seen),
        log,
        rich=None if world.main else False,
    )
    callbacks = [_StopOnNonFinite(start, describe_saved), ui]
    if training_callback is not None:
        callbacks.append(training_callback)
    # mlx-lm saves its own copy of the final weights; ours (with the optimizer
    # state) is the one that counts, so its copy goes to a scratch file
    scratch = folder / f".final-{ADAPTER_FILE}"
    # (rank 0 alone writes it; atomic_file turns a failed write into one line)
    scratch_file = atomic_file(scratch) if writer else contextlib.nullcontext(scratch)
    targs = lm_trainer.TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters - start,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        steps_per_save=args.iters + 1,  # we save (atomically, with state) ourselves
        max_seq_length=args.max_seq_length,
        adapter_file=str(scratch),
        grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps,
        clear_cache_threshold=args.clear_cache_threshold,
    )
    loss = make_loss(model, args)
    if world.size > 1:
        loss = GlobalMeanLoss(loss, world.group)
        log(
            describe(
                world, args.batch_size, args.grad_accumulation_steps, args.learning_rate
            )
        )
    with _new_folder(folder, writer):
        try:
            with guard(world, args.dist_timeout, folder, "training") as dog:
                check_same_start(world, model, train_set)
                with ui, _quiet_mlx_lm_console(), _restore_layer_call(model):
                    with scratch_file as tmp:
                        targs.adapter_file = str(tmp)
                        lm_trainer.train(
                            model,
                            optimizer,
                            train_set,
                            valid_set,
                            args=targs,
                            loss=loss,
                            iterate_batches=petting(iterate, dog),
                            training_callback=_Callbacks(*callbacks),
                        )
        finally:
            if writer:
                scratch.unlink(missing_ok=True)
        check_finite(args.iters)
        if writer:
            save(args.iters, numbered=args.iters % args.save_every == 0)
            log(f"Saved final weights to {folder / ADAPTER_FILE}.")
    result.history, result.val_history = ui.history, ui.val_history
    return result


def _silent(*_):
    pass


class _Callbacks(TrainingCallback):
    def __init__(self, *callbacks):
        self.callbacks = callbacks

    def on_train_loss_report(self, info):
        for c in self.callbacks:
            c.on_train_loss_report(info)

    def on_val_loss_report(self, info):
        for c in self.callbacks:
            c.on_val_loss_report(info)


def evaluate_model(args: LoraArgs, model, dataset, num_batches: int) -> float:
    """Mean CE over the output streams of ``dataset`` (Long-CE off in eval mode);
    under ``mlx.launch`` each rank evaluates its share and all get the mean."""
    world = init_world(args.dist_timeout)
    with guard(world, args.dist_timeout, args.adapter_path, "evaluation") as dog:
        loss = lm_trainer.evaluate(
            model,
            dataset,
            args.batch_size,
            num_batches,
            args.max_seq_length,
            loss=make_loss(model, args),
            iterate_batches=petting(BatchIterator(args.seed, pad_multiple(model, args)), dog),
        )
    model.train()
    return loss


def describe_test_loss(loss: float, vocab_size: int) -> str:
    """``Test loss …, Test ppl …``; the perplexity only where it means something
    (a finite loss below ``ln(vocab_size)``, i.e. better than uniform guessing)."""
    if not math.isfinite(loss):
        return f"Test loss {loss}, Test ppl n/a (the loss is not finite)."
    if loss > math.log(vocab_size):
        return (
            f"Test loss {loss:.3f}, Test ppl omitted (above the vocabulary size "
            f"{vocab_size}: worse than uniform guessing)."
        )
    return f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}."


def _config_layers(model: str) -> Optional[int]:
    """``num_hidden_layers`` from a local model folder's config.json (None when it
    cannot tell), to check --num-layers before anything heavy loads."""
    try:
        cfg = json.loads(Path(model, "config.json").read_text(encoding="utf-8"))
        text = cfg.get("text_config") or {}  # Qwen3.5 nests it
        n = cfg.get("num_hidden_layers", text.get("num_hidden_layers"))
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def run(args: LoraArgs, log=print, training_callback=None) -> RunResult:
    """Load the model and data of ``args``, then train and/or test."""
    from ..utils import load

    args.check()
    world = init_world(args.dist_timeout)  # a group of one unless mlx.launch ran us
    if not world.main:
        log = _silent  # rank 0 speaks for all; errors still reach every rank's stderr
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            "--data must be a folder with train.jsonl/valid.jsonl/test.jsonl, got "
            f"{args.data}."
        )
    for split, wanted in (("train", args.train), ("test", args.test)):
        if wanted and not (data_dir / f"{split}.jsonl").is_file():
            raise FileNotFoundError(f"No {split}.jsonl in {args.data}.")
    saved = None
    if not args.train and Path(args.adapter_path, CONFIG_FILE).is_file():
        saved = read_adapter_config(args.adapter_path)
    layers = _config_layers(args.model) if args.train else None
    if layers is not None:
        fit_num_layers(args, layers, log)
    np.random.seed(args.seed)
    log("Loading pretrained model")
    model, tokenizer = load(args.model)
    log("Loading datasets")
    splits = (["train", "valid"] if args.train else []) + (
        ["test"] if args.test else []
    )
    options = args.data_options(saved)
    if saved is not None:
        used = {
            "wait_k": options.wait_k,
            "auditor_wait": options.auditor_wait,
            "system_prompt": options.system,
        }
        reused = {
            k: v
            for k, v in used.items()
            if getattr(args, k) is None and saved.get(k) is not None
        }
        if reused:
            log(
                f"Data settings from {Path(args.adapter_path, CONFIG_FILE)}: "
                + ", ".join(f"{k}={v!r}" for k, v in reused.items())
            )
    data = load_datasets(
        args.data,
        tokenizer,
        model.streams,
        model.args.vocab_size,
        options,
        args.stream_weights,
        splits,
        log,
    )
    result = RunResult(adapter_path=Path(args.adapter_path))
    if args.train:
        if data["valid"] is None:
            log(
                f"[WARNING] No valid.jsonl in {args.data}: training without validation."
            )
        log("Training")
        result = train_model(
            args, model, data["train"], data["valid"], log, training_callback
        )
    elif Path(args.adapter_path, ADAPTER_FILE).is_file():
        load_adapters(model, args.adapter_path)
    else:
        log(f"No adapters in {args.adapter_path}: testing the base model.")
    if args.test:
        log("Testing")
        model.eval()
        result.test_loss = evaluate_model(args, model, data["test"], args.test_batches)
        log(describe_test_loss(result.test_loss, model.args.vocab_size))
    return result
