#!/usr/bin/env bash
# Fine-tune the bundled demo model (LoRA) on more examples of its task, fuse, and run it.
#   bash examples/finetune_demo.sh [OUT]
# examples/data/demo holds rows-format JSONL written by examples/demo/task.py.
set -euo pipefail
OUT=${1:-lora_demo}
MODEL=$(python -c "from mstream_mlx.utils import default_model_path; print(default_model_path())")

mstream-mlx lora --model "$MODEL" --data examples/data/demo --train --test \
    --iters 20 --batch-size 8 --num-layers -1 --learning-rate 1e-4 \
    --steps-per-eval 10 --adapter-path "$OUT/adapters"
mstream-mlx fuse --model "$MODEL" --adapter-path "$OUT/adapters" --save-path "$OUT/fused"
mstream-mlx generate --model "$OUT/fused" -p "add five minus two add nine" --streams Output
# or, unfused: the base model with the adapters applied at load time
mstream-mlx generate --model "$MODEL" --adapter-path "$OUT/adapters" -p "add five minus two" --streams Output
