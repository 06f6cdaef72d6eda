# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream speed, measured side by side with mlx-lm on the same weights.

One run builds (or loads) a model once and times, per number of streams N:

* our real decode path: :class:`~mstream_mlx.session.Session` in the blocks layout
  (paper §5-6) with N assistant heads, so every timestep feeds N tokens (plus the user's
  ``<|im_end|>`` at the first step, as the reference loop does);
* the same model in a bare loop (forward, argmax, ``async_eval`` pipelining), which
  shows what the Session's per-step work costs;
* the PyTorch reference decode loop on the same weights, when the caller passes the
  reference implementation in (``reference=``: a source checkout's ``tests/reference``,
  with torch; see :mod:`.reference`);

and, as the baseline, mlx-lm's ``stream_generate`` on mlx-lm's own model class holding
the very same weight arrays (minus the channel table).  A prefill table compares
``prefill()`` with mlx-lm's first token for each prompt length, on a single-stream
prompt and on a 10-stream rows prompt (explicit mask), with peak memory.

Everything is warmed up before timing and reported as the median over repeats.

    mstream-mlx bench --shape qwen3-0.6b --dtype bfloat16
"""

import dataclasses
import importlib
import platform
import statistics
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import BlocksOptions, RowsOptions, Session
from ..prefill import prefill
from ..session import generation_stream
from ..step import step
from .run import Run
from ..streams import Flat, blocks_spec, rows_spec, rows_to_flat

QWEN3 = {
    "model_type": "qwen3",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
# Random-weight shapes by name: the published Qwen3 configs (no download needed).
SHAPES = {
    "tiny": {
        **QWEN3,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 768,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 32000,
    },
    "qwen3-0.6b": {
        **QWEN3,
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
    "qwen3-4b": {
        **QWEN3,
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "intermediate_size": 9728,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
}
# The Stream-8B shape (paper §7: Qwen3-8B, untied head): the weight-bandwidth-bound regime
# closest to a Mac's, and the one the multi-stream argument is about.
SHAPES["qwen3-8b"] = {
    **QWEN3,
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
ROWS_PREFILL_STREAMS = 10  # the §7 rows model: 10 tokens share each timestep
# Synthetic vocabulary: ids 0-7 are the chat specials and single-token words the
# blocks layout needs; prompt ids are drawn above them.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("system", "user", "assistant", "\u010a", "\u0120-")  # byte-level "\n", " -"
FIRST_FREE_ID = len(SPECIALS) + len(WORDS)


@dataclass
class BenchOptions:
    """What to measure.

    Args:
        streams: numbers of streams N (assistant heads decoding at once).
        prompt_tokens: prompt length for the decode table (a single-stream prompt for
            mlx-lm; our system block for the multi-stream model).
        rows: decode timesteps per run.
        prefill_tokens: prompt lengths of the prefill table (default: prompt_tokens).
        repeats: timed runs per measurement (the median is reported).
        warmup: one untimed run of each shape first.
        reference_rows: decode timesteps of the reference loop (default: ``rows``).
        seed: prompt ids and random weights.
    """

    streams: Sequence[int] = (1, 2, 3, 4, 10)
    prompt_tokens: int = 512
    rows: int = 128
    prefill_tokens: Sequence[int] = ()
    repeats: int = 3
    warmup: bool = True
    reference_rows: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if not self.streams or min(self.streams) < 1:
            raise ValueError(f"streams must be >= 1, got {list(self.streams)}.")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}.")
        if self.rows < 2:
            raise ValueError(f"rows must be >= 2, got {self.rows}.")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}.")
        if any(p < 2 for p in self.prefill_tokens):
            raise ValueError(
                f"prefill_tokens must be >= 2, got {list(self.prefill_tokens)}."
            )


# ----------------------------------------------------------------- models
def synthetic_tokenizer(vocab_size: int):
    """A byte-level word tokenizer with ``vocab_size`` ids and the Qwen chat specials,
    so Session, its stop rules and mlx-lm's BPE streaming detokenizer run as they do
    on a real Qwen tokenizer (one O(1) detokenizer step per token)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    vocab.update({f"\u0120w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIALS[2], pad_token=SPECIALS[0]
    )
    return TokenizerWrapper(fast, BPEStreamingDetokenizer)


def random_model(shape: str, dtype=mx.bfloat16, seed: int = 0):
    """A random-weight multi-stream Qwen3 of a named shape, and a synthetic tokenizer."""
    from ..models.qwen3 import Model, ModelArgs

    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    spec = blocks_spec(3)
    args = ModelArgs.from_dict(
        {**SHAPES[shape], "num_channels": 3, "multistream": spec.to_config()}
    )
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, synthetic_tokenizer(args.vocab_size)


def set_heads(model, heads: int):
    """Give ``model`` the blocks layout with ``heads`` assistant heads: the channel
    table is resized to ``heads + 2`` rows (existing rows reused; timing only)."""
    C = heads + 2
    old = model.model.channel_embedding.weight
    if old.shape[0] != C:
        rows = mx.arange(C) % old.shape[0]
        table = nn.Embedding(C, old.shape[1])
        table.weight = old[rows]
        model.model.channel_embedding = table
        mx.eval(table.weight)
    model.args.num_channels = C
    model.args.multistream = blocks_spec(C).to_config()


def mlx_lm_model(model, quantization: Optional[dict] = None):
    """mlx-lm's own model class for ``model.args.model_type``, holding the same weight
    arrays as ``model`` (shared, not copied) minus the channel table."""
    try:
        family = importlib.import_module(f"mlx_lm.models.{model.args.model_type}")
    except ImportError as e:
        raise ValueError(
            f"mlx-lm has no model {model.args.model_type!r} to compare with."
        ) from e
    config = {**dataclasses.asdict(model.args), "max_position_embeddings": 40960}
    lm = family.Model(family.ModelArgs.from_dict(config))
    weights = [
        (k, v)
        for k, v in tree_flatten(model.parameters())
        if "channel_embedding" not in k
    ]
    if quantization:
        names = {k for k, _ in weights}
        nn.quantize(
            lm,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=lambda p, m: f"{p}.scales" in names,
        )
    lm.load_weights(weights, strict=True)
    lm.eval()
    return lm


def weight_bytes(model) -> int:
    return sum(
        v.nbytes
        for k, v in tree_flatten(model.parameters())
        if "channel_embedding" not in k
    )


# ---------------------------------------------------------------- timings
def _fresh():
    """Every timed run starts alike: an empty allocator cache, peak memory reset."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()


def _clock(events) -> List[float]:
    times = []
    for _ in events:
        times.append(time.perf_counter())
    return times


def run_mlx_lm(lm, tokenizer, prompt: List[int], rows: int) -> Run:
    """mlx-lm's ``stream_generate`` (greedy): the first response ends the prefill."""
    from mlx_lm.generate import stream_generate

    _fresh()
    start = time.perf_counter()
    times = _clock(
        stream_generate(lm, tokenizer, mx.array(prompt), max_tokens=rows + 1)
    )
    return Run(
        len(prompt),
        times[0] - start,
        len(times) - 1,
        len(times) - 1,
        times[-1] - times[0],
        mx.get_peak_memory() / 1e9,
    )


def run_session(model, tokenizer, prompt: List[int], heads: int, rows: int) -> Run:
    """Our decode step: a blocks Session with ``heads`` heads, the prompt as the system
    block, greedy, no stop tokens, ``rows`` timesteps after the first token."""
    set_heads(model, heads)
    session = Session(
        model,
        tokenizer,
        max_tokens=rows + 1,
        max_steps=rows,
        stop_tokens={},
        blocks=BlocksOptions(system=prompt),
    )
    _fresh()
    start = time.perf_counter()
    times, tokens, last = [], 0, None
    for event in session:
        times.append(time.perf_counter())
        if len(times) > 1:
            tokens += sum(t is not None for t in event.tokens.values()) - int(
                event.tokens["user"] is not None
            )
        last = event
    return Run(
        last.prompt_tokens,
        times[0] - start,
        last.generation_timesteps,
        tokens,
        times[-1] - times[0],
        mx.get_peak_memory() / 1e9,
    )


def run_rows_session(
    model, tokenizer, prompt: List[int], channels: int, rows: int
) -> Run:
    """The §7 rows schedule: ``channels`` streams, the prompt as prefill rows (one
    token per channel per row), then ``rows`` decode rows of ``channels`` tokens."""
    set_heads(model, channels - 2)
    blocks = model.args.multistream
    silence = tokenizer.encode(" -", add_special_tokens=False)[0]
    model.args.multistream = rows_spec(channels, silence).to_config()
    table = np.resize(prompt, max(channels, len(prompt) - len(prompt) % channels))
    options = RowsOptions(prefill_rows=table.reshape(-1, channels).tolist())
    try:
        session = Session(model, tokenizer, rows=options, max_steps=rows, interactive=False)
        _fresh()
        start = time.perf_counter()
        times = _clock(session)
    finally:
        model.args.multistream = blocks
    steps = len(times) - 1
    return Run(
        table.size,
        times[0] - start,
        steps,
        steps * channels,
        times[-1] - times[0],
        mx.get_peak_memory() / 1e9,
    )


def _pipelined(
    launch: Callable[[mx.array, int], mx.array], first: mx.array, rows: int
) -> List[float]:
    """The decode loop both bare loops share (ours and mlx-lm's batch-N): step ``t + 1``
    is launched (``launch(tokens, t)``, evaluated asynchronously) before step ``t``'s
    tokens are read.  Returns the clock after ``first`` and after each of ``rows`` steps."""
    first.tolist()
    times = [time.perf_counter()]
    cur = launch(first, 0)
    for t in range(rows):
        nxt = launch(cur, t + 1) if t + 1 < rows else None
        cur.tolist()
        times.append(time.perf_counter())
        cur = nxt
    return times


def run_model_loop(model, prompt: List[int], heads: int, rows: int) -> Run:
    """The same model without Session: prefill, then ``rows`` steps of ``heads`` tokens
    (forward, argmax, the next step launched before the current one is read)."""
    set_heads(model, heads)
    P = len(prompt)
    cache = model.make_cache()
    channels = list(range(2, heads + 2))
    flat = Flat(
        np.array(prompt, np.int32), np.zeros(P, np.int32), np.arange(P, dtype=np.int32)
    )

    def launch(tokens, t):
        # positions from a host list (the mask is derived from them on the host)
        out = mx.argmax(step(model, cache, tokens, channels, [P + t] * heads), axis=-1)
        mx.async_eval(out)
        return out

    _fresh()
    start = time.perf_counter()
    with mx.stream(generation_stream):
        first = prefill(model, flat, cache, logits_at=[P - 1])
        times = _pipelined(launch, mx.broadcast_to(mx.argmax(first, axis=-1), (heads,)), rows)
    return Run(
        P,
        times[0] - start,
        rows,
        rows * heads,
        times[-1] - times[0],
        mx.get_peak_memory() / 1e9,
    )


def run_mlx_lm_batch(lm, prompt: List[int], batch: int, rows: int) -> Run:
    """mlx-lm's model decoding ``batch`` sequences at once (the prompt in every row),
    in the same pipelined loop: what ``batch`` tokens per step cost the backend
    without any multi-stream logic.  Decode only (its prefill is ``batch`` prompts)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm)

    def launch(tokens, t):
        out = mx.argmax(lm(tokens[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(out)
        return out

    with mx.stream(generation_stream):
        logits = lm(mx.array([prompt] * batch), cache=cache)[:, -1]
        first = mx.argmax(logits, axis=-1)
        _fresh()
        times = _pipelined(launch, first, rows)
    return Run(
        len(prompt),
        0.0,
        rows,
        rows * batch,
        times[-1] - times[0],
        mx.get_peak_memory() / 1e9,
    )


def prefill_ours(model, flat: Flat) -> Run:
    """``prefill()`` of ``flat`` and the first sampled token (argmax)."""
    cache = model.make_cache()
    _fresh()
    start = time.perf_counter()
    logits = prefill(model, flat, cache, logits_at=[len(flat) - 1])
    mx.argmax(logits, axis=-1).tolist()
    t = time.perf_counter() - start
    return Run(len(flat), t, 0, 0, 0.0, mx.get_peak_memory() / 1e9)


def prefill_mlx_lm(lm, prompt: List[int]) -> Run:
    """mlx-lm's ``generate_step`` up to its first token."""
    from mlx_lm.generate import generate_step

    _fresh()
    start = time.perf_counter()
    next(generate_step(mx.array(prompt), lm, max_tokens=1))
    t = time.perf_counter() - start
    return Run(len(prompt), t, 0, 0, 0.0, mx.get_peak_memory() / 1e9)


# -------------------------------------------------------------------- driver
def _summary(runs: List[Run]) -> Dict:
    """Medians of a list of runs, and the runs themselves (``samples``)."""

    def med(f):
        return statistics.median(f(r) for r in runs)

    decode = runs[0].timesteps > 0
    return {
        "prompt_tokens": runs[0].prompt_tokens,
        "ttft_s": med(lambda r: r.ttft),
        "prefill_tps": med(lambda r: r.prefill_tps),
        "timesteps": runs[0].timesteps,
        "timesteps_per_s": med(lambda r: r.timesteps_per_sec) if decode else None,
        "tokens_per_s": med(lambda r: r.tokens_per_sec) if decode else None,
        "peak_memory_gb": max(r.peak_memory for r in runs),
        "samples": [dataclasses.asdict(r) for r in runs],
    }


def interleaved(
    fns: Dict[str, Callable[[], Run]], repeats: int, warm: Sequence[str] = ()
) -> Dict[str, List[Run]]:
    """``repeats`` rounds, each running every function once in turn, so that a busy
    machine slows all of them alike; the functions named in ``warm`` run once first."""
    for k in warm:
        fns[k]()
    runs: Dict[str, List[Run]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            runs[k].append(f())
    return runs


def paired_ratio(a: List[Run], b: List[Run], metric: str) -> Optional[float]:
    """Median over rounds of ``a[i].metric / b[i].metric`` (runs of the same round)."""
    pairs = [(getattr(x, metric), getattr(y, metric)) for x, y in zip(a, b)]
    if not pairs or any(y == 0 for _, y in pairs):
        return None
    return statistics.median(x / y for x, y in pairs)


def device_name() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu and mx.cuda.is_available():
        try:
            import torch

            if torch.cuda.is_available():
                return f"{torch.cuda.get_device_name(0)} (MLX CUDA backend)"
        except ImportError:
            pass
        return "NVIDIA GPU (MLX CUDA backend)"
    if dev.type == mx.gpu:
        return "Apple GPU (Metal)"
    return f"CPU {platform.machine()} {platform.processor() or ''}".strip()


def run_bench(
    model,
    tokenizer,
    opts: BenchOptions,
    *,
    name: str = "",
    quantization: Optional[dict] = None,
    reference: Optional[ModuleType] = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Measure ``model`` against mlx-lm (and the reference) and return the report.

    Args:
        model, tokenizer: a multi-stream Qwen3/Qwen2 model (its channel table is
            resized per N) and a tokenizer whose ``"<|im_start|>"``, ``"<|im_end|>"``,
            ``"system"``, ``"user"``, ``"assistant"`` and ``"\\n"`` are single tokens.
        opts: what to measure.
        name: shape or model path, for the report.
        quantization: the model folder's ``quantization`` entry (shared weights).
        reference: the PyTorch reference implementation to time beside ours (a
            module with ``RefModel`` and ``blocks_generate``, e.g. ``tests.reference``
            of a source checkout; needs torch); ``None``: no reference column.
        log: progress lines.

    Returns:
        A JSON-ready dict; ``streams`` has one entry per N with our Session, the bare
        model loop, the reference and the ratios to the mlx-lm ``baseline``.
    """
    rng = np.random.default_rng(opts.seed)
    vocab = model.args.vocab_size
    prompt = rng.integers(FIRST_FREE_ID, vocab, opts.prompt_tokens).tolist()
    lm = mlx_lm_model(model, quantization)
    ref = None
    if reference is not None:
        from .reference import TorchReference

        ref = TorchReference(model, max(opts.streams), reference)
    report = {
        "name": name,
        "device": device_name(),
        "mlx": mx.__version__,
        "mlx_lm": importlib.import_module("mlx_lm").__version__,
        "dtype": str(model.model.embed_tokens.weight.dtype).replace("mlx.core.", ""),
        "params_b": sum(v.size for _, v in tree_flatten(model.parameters())) / 1e9,
        "weights_gb": weight_bytes(model) / 1e9,
        "prompt_tokens": opts.prompt_tokens,
        "rows": opts.rows,
        "repeats": opts.repeats,
        "reference_device": None if ref is None else ref.device_name,
    }
    log(f"[bench] {name} on {report['device']}, {report['dtype']}")

    rows, baseline = [], []
    ref_rows = opts.reference_rows or opts.rows
    for i, n in enumerate(opts.streams):
        log(
            f"[bench] N={n}: mlx-lm, Session, model loop"
            + (", reference" if ref else "")
        )
        fns = {
            "mlx_lm": lambda: run_mlx_lm(lm, tokenizer, prompt, opts.rows),
            "session": lambda: run_session(model, tokenizer, prompt, n, opts.rows),
            "model_loop": lambda: run_model_loop(model, prompt, n, opts.rows),
            "mlx_lm_batch": lambda: run_mlx_lm_batch(lm, prompt, n, opts.rows),
        }
        warm = [k for k in fns if k != "mlx_lm" or i == 0] if opts.warmup else []
        runs = interleaved(fns, opts.repeats, warm)
        baseline += runs["mlx_lm"]
        ses, base = runs["session"], runs["mlx_lm"]
        entry = {"n": n, **{k: _summary(v) for k, v in runs.items()}}
        entry.update(
            timesteps_vs_mlx_lm=paired_ratio(ses, base, "timesteps_per_sec"),
            tokens_vs_mlx_lm=paired_ratio(ses, base, "tokens_per_sec"),
            prefill_vs_mlx_lm=paired_ratio(ses, base, "prefill_tps"),
            loop_timesteps_vs_mlx_lm=paired_ratio(
                runs["model_loop"], base, "timesteps_per_sec"
            ),
            timesteps_vs_mlx_lm_batch=paired_ratio(
                ses, runs["mlx_lm_batch"], "timesteps_per_sec"
            ),
            loop_timesteps_vs_mlx_lm_batch=paired_ratio(
                runs["model_loop"], runs["mlx_lm_batch"], "timesteps_per_sec"
            ),
        )
        if ref is not None:
            if opts.warmup:
                ref.run(prompt, n, 2)
            entry["reference"] = _summary([ref.run(prompt, n, ref_rows)])
            entry["timesteps_vs_reference"] = (
                entry["session"]["timesteps_per_s"]
                / entry["reference"]["timesteps_per_s"]
            )
        rows.append(entry)
    report["baseline"] = _summary(baseline)
    report["streams"] = rows

    C = ROWS_PREFILL_STREAMS
    log(f"[bench] rows decode, C={C}: Session, mlx-lm batch-{C}")
    fns = {
        "session": lambda: run_rows_session(model, tokenizer, prompt, C, opts.rows),
        "mlx_lm_batch": lambda: run_mlx_lm_batch(lm, prompt, C, opts.rows),
    }
    runs = interleaved(fns, opts.repeats, list(fns) if opts.warmup else [])
    report["rows_decode"] = {"channels": C, **{k: _summary(v) for k, v in runs.items()}}
    report["rows_decode"]["timesteps_vs_mlx_lm_batch"] = paired_ratio(
        runs["session"], runs["mlx_lm_batch"], "timesteps_per_sec"
    )

    table = []
    for P in opts.prefill_tokens or [opts.prompt_tokens]:
        log(f"[bench] prefill {P} tokens")
        ids = rng.integers(FIRST_FREE_ID, vocab, P)
        single = Flat(
            ids.astype(np.int32), np.zeros(P, np.int32), np.arange(P, dtype=np.int32)
        )
        C = ROWS_PREFILL_STREAMS
        set_heads(model, C - 2)
        multi = rows_to_flat(np.resize(ids, max(C, P - P % C)).reshape(-1, C))
        fns = {
            "mlx_lm": lambda: prefill_mlx_lm(lm, ids.tolist()),
            "ours": lambda: prefill_ours(model, single),
            "ours_rows": lambda: prefill_ours(model, multi),
        }
        runs = interleaved(fns, opts.repeats, list(fns) if opts.warmup else [])
        entry = {"tokens": P, **{k: _summary(v) for k, v in runs.items()}}
        entry["ratio"] = paired_ratio(runs["ours"], runs["mlx_lm"], "prefill_tps")
        entry["rows_ratio"] = paired_ratio(
            runs["ours_rows"], runs["mlx_lm"], "prefill_tps"
        )
        table.append(entry)
    report["prefill"] = table
    report["targets"] = targets(report)
    return report


def measure(
    opts: BenchOptions,
    *,
    model: Optional[str] = None,
    shape: Optional[str] = None,
    dtype: Optional[str] = None,
    reference: Optional[ModuleType] = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Build a random model of ``shape`` (or load ``model``) and :func:`run_bench` it.

    Args:
        opts: what to measure.
        model: a model folder or Hub id (Qwen3/Qwen2 family).
        shape: a name in :data:`SHAPES` (random weights, synthetic tokenizer).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default bfloat16 for a
            shape, the stored dtype for a loaded model.
        reference, log: see :func:`run_bench`.
    """
    if (model is None) == (shape is None):
        raise ValueError("Give exactly one of --model and --shape.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    quantization = None
    if shape is not None:
        log(f"[bench] building random {shape} ({dtype or 'bfloat16'})")
        net, tokenizer = random_model(shape, DTYPES[dtype or "bfloat16"], opts.seed)
        name = f"random {shape}"
    else:
        from mlx_lm.utils import load_config

        from ..utils import load, resolve_model_path

        path = resolve_model_path(model)
        net, tokenizer = load(str(path))
        if net.args.model_type not in ("qwen3", "qwen2"):
            raise ValueError(
                f"bench times Qwen3/Qwen2 models (the blocks layout), not "
                f"{net.args.model_type!r}."
            )
        quantization = load_config(path).get("quantization")
        if dtype is not None:
            net.set_dtype(DTYPES[dtype])
        name = str(model)
    return run_bench(
        net,
        tokenizer,
        opts,
        name=name,
        quantization=quantization,
        reference=reference,
        log=log,
    )


# The paper's own rows decode loop (its §7 generate: PyTorch, bf16, C = 10, greedy) on one
# NVIDIA H200, random weights (issue 15's measurement): the anchor of the rows target.
PAPER_LOOP_ROWS_PER_S = {"qwen3-0.6b": 11.5, "qwen3-8b": 8.4}
# Peak memory bandwidth (TB/s) of the GPUs we measured on, by a word of their name:
# a decode step reads every weight once, so weights x steps/s over this is how close
# a step comes to the bandwidth limit.
PEAK_BANDWIDTH_TB_S = {"H200": 4.8, "H100": 3.35}


def peak_bandwidth(device: str) -> Optional[float]:
    """The peak memory bandwidth (TB/s) of a device named in :data:`PEAK_BANDWIDTH_TB_S`."""
    return next((tb for word, tb in PEAK_BANDWIDTH_TB_S.items() if word in device), None)


def targets(report: dict) -> Dict[str, dict]:
    """Issue 15's targets, checked on the measured numbers (docs/benchmarks.md)."""
    by_n = {e["n"]: e for e in report["streams"]}
    out = {}
    if 1 in by_n:
        r = by_n[1]["timesteps_vs_mlx_lm"]
        out["session_n1_ge_0.95x_mlx_lm"] = {"ratio": r, "met": r is not None and r >= 0.95}
    many = {n: e for n, e in by_n.items() if n > 1}
    if many:
        ses = {n: e["timesteps_vs_mlx_lm_batch"] for n, e in many.items()}
        loop = {n: e["loop_timesteps_vs_mlx_lm_batch"] for n, e in many.items()}
        out["session_ge_1.0x_mlx_lm_batch"] = {
            "ratio": ses, "met": all(r is not None and r >= 1.0 for r in ses.values())
        }
        out["loop_ge_0.95x_mlx_lm_batch"] = {
            "ratio": loop, "met": all(r is not None and r >= 0.95 for r in loop.values())
        }
    rows = report.get("rows_decode")
    if rows:
        r = rows["timesteps_vs_mlx_lm_batch"]
        out["rows_ge_1.0x_mlx_lm_batch"] = {"ratio": r, "met": r is not None and r >= 1.0}
        shape = report["name"].removeprefix("random ")  # the CLI's name for a shape
        paper = PAPER_LOOP_ROWS_PER_S.get(shape)
        if paper and "H200" in report["device"]:  # the anchor was measured on an H200
            got = rows["session"]["timesteps_per_s"]
            out["rows_ge_10x_paper_loop"] = {
                "rows_per_s": got, "anchor_h200": paper, "met": got >= 10 * paper
            }
    for e in report["prefill"]:
        if e["tokens"] < 2048:
            continue
        act = {
            k: e[k]["peak_memory_gb"] - report["weights_gb"] for k in ("ours_rows", "mlx_lm")
        }
        out[f"rows_prefill_{e['tokens']}"] = {
            "activation_gb": act,
            "tokens_ratio": e["rows_ratio"],
            "met": act["ours_rows"] <= 1.2 * act["mlx_lm"] + 0.05 and e["rows_ratio"] >= 0.9,
        }
    # weights read per decode step: how close each N comes to the bandwidth limit
    rates = {"mlx-lm": report["baseline"]["timesteps_per_s"]}
    rates.update({n: e["session"]["timesteps_per_s"] for n, e in by_n.items()})
    if rows:
        rates["rows"] = rows["session"]["timesteps_per_s"]
    gb_s = {k: report["weights_gb"] * r for k, r in rates.items()}
    peak = peak_bandwidth(report["device"])
    out["weight_bandwidth"] = {
        "gb_per_s": gb_s,
        "peak_tb_s": peak,
        "fraction": None if peak is None else {k: v / (1e3 * peak) for k, v in gb_s.items()},
    }
    return out


# ------------------------------------------------------------------- output
def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_tables(report: dict) -> str:
    """Markdown tables of a report (decode per N, then prefill)."""
    base = report["baseline"]
    has_ref = any("reference" in e for e in report["streams"])
    lines = [
        f"Device: {report['device']}; {report['name']}, {report['dtype']}, "
        f"{report['params_b']:.2f} B params; prompt {report['prompt_tokens']} tokens, "
        f"{report['rows']} decode timesteps, median of {report['repeats']}; "
        f"mlx {report['mlx']}, mlx-lm {report['mlx_lm']}.",
        "",
        "| N | timesteps/s | tokens/s | vs mlx-lm (steps / tokens) | model loop steps/s"
        " | mlx-lm batch N steps/s"
        + (" | reference steps/s" if has_ref else "")
        + " | prefill tok/s | TTFT s | peak GB |",
        "|---|---|---|---|---|---" + ("|---" if has_ref else "") + "|---|---|---|",
        f"| mlx-lm (1 stream) | {_f(base['timesteps_per_s'])} | {_f(base['tokens_per_s'])} "
        "| 1.00 | - | -"
        + (" | -" if has_ref else "")
        + f" | {_f(base['prefill_tps'])} | {_f(base['ttft_s'], '.3f')} "
        f"| {_f(base['peak_memory_gb'], '.2f')} |",
    ]
    for e in report["streams"]:
        s, loop = e["session"], e["model_loop"]
        ref = e.get("reference")
        lines.append(
            f"| {e['n']} | {_f(s['timesteps_per_s'])} | {_f(s['tokens_per_s'])} "
            f"| {_f(e['timesteps_vs_mlx_lm'], '.2f')} / "
            f"{_f(e['tokens_vs_mlx_lm'], '.2f')} "
            f"| {_f(loop['timesteps_per_s'])} "
            f"| {_f(e['mlx_lm_batch']['timesteps_per_s'])}"
            + (f" | {_f(ref['timesteps_per_s'])}" if has_ref else "")
            + f" | {_f(s['prefill_tps'])} | {_f(s['ttft_s'], '.3f')} "
            f"| {_f(s['peak_memory_gb'], '.2f')} |"
        )
    rows = report.get("rows_decode")
    if rows:
        s = rows["session"]
        lines += [
            "",
            f"Rows layout (§7), C = {rows['channels']}: Session "
            f"{_f(s['timesteps_per_s'])} rows/s ({_f(s['tokens_per_s'])} tokens/s), mlx-lm "
            f"batch-{rows['channels']} {_f(rows['mlx_lm_batch']['timesteps_per_s'])} "
            f"steps/s, ratio {_f(rows['timesteps_vs_mlx_lm_batch'], '.2f')}.",
        ]
    lines += [
        "",
        "| prompt tokens | ours tok/s (1 stream) | ours tok/s (10-stream rows) "
        "| mlx-lm tok/s | ratio | peak GB ours / rows / mlx-lm |",
        "|---|---|---|---|---|---|",
    ]
    for e in report["prefill"]:
        lines.append(
            f"| {e['tokens']} | {_f(e['ours']['prefill_tps'])} "
            f"| {_f(e['ours_rows']['prefill_tps'])} | {_f(e['mlx_lm']['prefill_tps'])} "
            f"| {_f(e['ratio'], '.2f')} | {_f(e['ours']['peak_memory_gb'], '.2f')} / "
            f"{_f(e['ours_rows']['peak_memory_gb'], '.2f')} / "
            f"{_f(e['mlx_lm']['peak_memory_gb'], '.2f')} |"
        )
    bw = report["targets"].get("weight_bandwidth")
    if bw and bw["fraction"]:
        lines += [
            "",
            f"Weights read per second, as a fraction of the device's "
            f"{bw['peak_tb_s']} TB/s: "
            + ", ".join(
                f"{'N = ' if isinstance(k, int) else ''}{k} {v:.0%}"
                for k, v in bw["fraction"].items()
            )
            + ".",
        ]
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    for key, t in report["targets"].items():
        if "met" in t:
            detail = "; ".join(f"{k} {_brief(v)}" for k, v in t.items() if k != "met")
            lines.append(f"| {key} | {'yes' if t['met'] else '**no**'} | {detail} |")
    return "\n".join(lines)


def _brief(value) -> str:
    """A measured value in a table cell: floats to 3 digits, mappings flattened."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_brief(v)}" for k, v in value.items())
    return "-" if value is None else str(value)
