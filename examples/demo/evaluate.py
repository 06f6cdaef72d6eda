# Copyright © 2026 mstream-mlx contributors.
"""Score the demo models on the test split: exact-match accuracy and the time from
the first input token to the first correct output token, multi-stream vs
read-then-answer.  Writes MODEL_CARD.md and results.json into --out.

    python examples/demo/evaluate.py --out build/demo [--limit 500]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from statistics import mean

import mstream_mlx
from mstream_mlx import RowsOptions, Session

sys.path.insert(0, str(Path(__file__).parent))
import task  # noqa: E402


def run_episode(model, tokenizer, table) -> dict:
    """Feed the user cells exactly as in the data (silence in the gaps), step at full
    speed until the all-silent row, and time the first correct answer."""
    spec = model.streams
    sil = spec.silence_token
    user = [c for c in table["User"]]
    # each cell is one token, encoded as the training data was (tuner/datasets.py)
    ids = [sil if w is None else tokenizer.encode(w, add_special_tokens=False)[0] for w in user]
    # the data ends with silent rows; feeding them would only delay the stop rule
    while ids and ids[-1] == sil:
        ids.pop()
    expect = [c for c in table["Output"] if c is not None]
    # the test data has pauses of up to task.LONG_GAP silent rows: don't stop in them
    rows = RowsOptions.for_model(model, silence_exit=task.LONG_GAP + 3)
    session = Session(model, tokenizer, rows=rows, max_steps=len(user) + 3 * len(expect) + 8)
    session.feed("User", ids[task.PRE_THINK :])
    answers, first_in, t0, first_ok = [], None, None, None
    for ev in session:
        now = time.perf_counter()
        if first_in is None and ev.tokens["User"] is not None:
            first_in, t0 = ev.y["User"], now
        tok = ev.tokens["Output"]
        if tok is not None and tok != sil:
            answers.append(tokenizer.decode([tok]).strip())
            if first_ok is None and answers[-1] == expect[0] and t0 is not None:
                first_ok = (ev.y["Output"] - first_in, now - t0)
    # training episodes end one row after the last total, so what a model writes
    # after that is out of distribution: score the first len(expect) answers
    return {
        "correct": answers[: len(expect)] == expect,
        "first": first_ok,
        "rows_per_s": ev.timesteps_per_sec,
    }


def evaluate(folder: Path, data: Path, limit: int) -> dict:
    model, tokenizer = mstream_mlx.load(str(folder))
    rows = [json.loads(l)["streams"] for l in open(data / "test.jsonl")][:limit]
    results = [run_episode(model, tokenizer, t) for t in rows]
    firsts = [r["first"] for r in results if r["first"] is not None]
    return {
        "episodes": len(results),
        "accuracy": mean(r["correct"] for r in results),
        # None when no episode was answered right (a quick-mode build)
        "first_answer_timesteps": mean(f[0] for f in firsts) if firsts else None,
        "first_answer_seconds": mean(f[1] for f in firsts) if firsts else None,
        "rows_per_second": mean(r["rows_per_s"] for r in results),
    }


CARD = """# mstream-mlx demo model: running totals, answered while you speak

A {params:.2f} M-parameter Qwen3-shaped multi-stream model (hidden 128, 4 layers, 3
streams: User, Output, Thinking; rows layout, SentencePiece word tokenizer of {vocab}
pieces), trained **from scratch** on a synthetic task by `mstream-mlx lora
--fine-tune-type full` (`python examples/demo/build.py --seed {seed} --steps {iters}`;
data, tokenizer and training took {train_min:.1f} min on {machine}).

The user dictates operations word by word (`add five minus two add nine`). Two rows
after each number the Output stream writes the new total and the Thinking stream the
operation it parsed (`+5`), while the user is still talking.

| model (same size, same training) | test exact match | first correct answer after the first input token |
|---|---|---|
| multi-stream (answers while reading) | {s_acc:.1%} | {s_first} |
| read-then-answer baseline | {b_acc} | {b_first} |

{n} test episodes (1-8 operations, pauses of up to 24 rows), greedy decoding, measured on
{machine}. Exact match: the Output stream's first answers are exactly the running
totals (what a model writes after the episode's last total is not scored: training
episodes end one row after it)."""


def _first(r: dict) -> str:
    if r["first_answer_timesteps"] is None:
        return "never (no episode answered correctly)"
    return f"{r['first_answer_timesteps']:.1f} timesteps, {r['first_answer_seconds']:.3f} s"


def machine_name() -> str:
    """The processor and MLX backend the numbers come from."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        return f"{mx.device_info().get('device_name', 'an NVIDIA GPU')} (MLX CUDA backend)"
    if mx.default_device() == mx.gpu:
        return f"{platform.machine()} {platform.system()} (MLX Metal backend)"
    return f"{platform.machine()} CPU, {platform.system()} (MLX CPU backend)"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="the build's seed (for the card)")
    p.add_argument("--steps", type=int, default=2000, help="the build's steps (for the card)")
    p.add_argument("--train-seconds", type=float, default=0.0, help="the build's time (for the card)")
    p.add_argument("--no-baseline", action="store_true", help="score the multi-stream model only")
    args = p.parse_args()
    res = {
        name: evaluate(args.out / f"{name}-model", args.out / "data" / name, args.limit)
        for name in ("stream",) + (() if args.no_baseline else ("baseline",))
    }
    res["build"] = {
        "seed": args.seed,
        "steps": args.steps,
        "train_seconds": args.train_seconds,
        "machine": machine_name(),
    }
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    model, tok = mstream_mlx.load(str(args.out / "stream-model"))
    from mlx.utils import tree_flatten

    s, b = res["stream"], res.get("baseline")
    card = CARD.format(
        params=sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6,
        vocab=len(tok.get_vocab()),
        iters=args.steps,
        seed=args.seed,
        train_min=args.train_seconds / 60,
        s_acc=s["accuracy"], s_first=_first(s),
        b_acc=f"{b['accuracy']:.1%}" if b else "not built (--no-baseline)",
        b_first=_first(b) if b else "",
        n=s["episodes"],
        machine=machine_name(),
    )
    (args.out / "MODEL_CARD.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
