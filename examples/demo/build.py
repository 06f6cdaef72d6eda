# Copyright © 2026 mstream-mlx contributors.
"""Build the bundled demo model from nothing, with mstream-mlx's own commands.

    python examples/demo/build.py --out build/demo [--seed 0] [--steps 2000] [--install]

The build is deterministic for a given seed on a given backend and machine: the data
come from a fixed seed, the models' initialisation, batch order and dropout from
``--seed``.  ``--steps 50`` is a quick mode that finishes in minutes (its models are
not good; it checks that the pipeline works).  docs/demo.md lists the measured spread
over seeds and how long a full build takes.

1. data: the running-total task (task.py), multi-stream and read-then-answer splits;
2. a SentencePiece tokenizer trained on the task's words;
3. two randomly initialised Qwen3-shaped models (same size), one per schedule;
4. training from scratch: `mstream-mlx lora --fine-tune-type full`, then `fuse`;
5. evaluation on the test split (evaluate.py): accuracy and time to first answer;
6. --install copies the multi-stream model to mstream_mlx/assets/default_model.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
import task  # noqa: E402

# --- settings ---------------------------------------------------------------------
DATA_SEED = 0  # the episodes: fixed, so every seed trains and is scored on the same data
SPLITS = {"train": 12000, "valid": 200, "test": 500}
MODEL = dict(  # Qwen3 shape; small enough that chat runs at hundreds of rows/s on 2 cores
    model_type="qwen3",
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
# silence_exit: a run with a fed prompt ends 4 silent rows after the last answer
# (interactive runs, e.g. chat, never end on silence)
ROWS_OPTIONS = {"seed_words": [], "silence_penalty": 0.0, "pre_think": task.PRE_THINK, "silence_exit": 4}
TRAIN = dict(iters=2000, batch_size=32, learning_rate=2e-3, steps_per_eval=500)
ASSET = Path(__file__).resolve().parents[2] / "mstream_mlx" / "assets" / "default_model"
# ---------------------------------------------------------------------------------


def write_data(out: Path) -> None:
    for name, baseline in (("stream", False), ("baseline", True)):
        for i, (split, n) in enumerate(SPLITS.items()):
            rows = task.make_split(DATA_SEED * 100 + i, n, baseline=baseline)
            d = out / "data" / name
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def write_tokenizer(folder: Path) -> None:
    """A word-level SentencePiece model over the task's words, saved as the HF files
    mlx-lm loads (tokenizer.json) plus the SentencePiece model itself."""
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = task.vocabulary()
    rng = random.Random(DATA_SEED)
    corpus = [" ".join(rng.sample(words, 20)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=len(words) + 4,
        model_type="word",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))


def write_init_model(folder: Path, streams, seed: int) -> None:
    """A randomly initialised model folder: config.json, weights, tokenizer."""
    from mstream_mlx.models import qwen3
    from mstream_mlx.streams import StreamSpec, silence_token_id
    from transformers import AutoTokenizer

    write_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    spec = StreamSpec(tuple(streams), (0,), "rows", silence_token_id(tok))
    # generation defaults the model was trained for: a silent seed row, no silence
    # penalty (the Output stream is meant to stay silent between answers)
    ms = dict(spec.to_config(), rows_options=ROWS_OPTIONS)
    config = dict(MODEL, vocab_size=len(tok), num_channels=len(streams), multistream=ms)
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order, dropout")
    p.add_argument("--steps", type=int, default=TRAIN["iters"], help="training steps per model")
    p.add_argument("--limit", type=int, default=SPLITS["test"], help="test episodes to score")
    p.add_argument("--no-baseline", action="store_true", help="build the multi-stream model only")
    p.add_argument("--install", action="store_true", help="copy the result into the package")
    args = p.parse_args()
    if args.steps < 1 or args.limit < 1:
        p.error("--steps and --limit must be >= 1")
    out = args.out
    start = time.perf_counter()
    write_data(out)
    models = [("stream", task.STREAMS), ("baseline", task.BASELINE_STREAMS)]
    for name, streams in models[: 1 if args.no_baseline else 2]:
        init, adapters, fused = out / f"{name}-init", out / f"{name}-adapters", out / f"{name}-model"
        for d in (init, adapters, fused):
            shutil.rmtree(d, ignore_errors=True)
        write_init_model(init, streams, args.seed)
        run(
            "mstream-mlx", "lora", "--model", str(init), "--data", str(out / "data" / name),
            "--train", "--test", "--fine-tune-type", "full", "--num-layers", "-1",
            "--adapter-path", str(adapters),
            "--iters", str(args.steps), "--batch-size", str(TRAIN["batch_size"]),
            "--learning-rate", str(TRAIN["learning_rate"]),
            "--steps-per-eval", str(min(TRAIN["steps_per_eval"], args.steps)),
            "--seed", str(args.seed),
        )
        run("mstream-mlx", "fuse", "--model", str(init), "--adapter-path", str(adapters), "--save-path", str(fused))
    train_seconds = time.perf_counter() - start
    run(
        sys.executable, str(Path(__file__).parent / "evaluate.py"), "--out", str(out),
        "--limit", str(args.limit), "--seed", str(args.seed), "--steps", str(args.steps),
        "--train-seconds", f"{train_seconds:.0f}", *(["--no-baseline"] if args.no_baseline else []),
    )
    if args.install:
        shutil.rmtree(ASSET, ignore_errors=True)
        shutil.copytree(out / "stream-model", ASSET)
        shutil.copy(out / "MODEL_CARD.md", ASSET / "README.md")
        print(f"installed {ASSET}")


if __name__ == "__main__":
    main()
