#!/usr/bin/env bash
# One short GPU session, as recorded in docs/BENCHMARKS.md and docs/EMBEDDED.md:
#   1. (TRAIN_MIN > 0 only) train the embedded DiT on the GPU for TRAIN_MIN minutes (seed 0, batch 256)
#      and score 100 samples per class of it (DDIM 50, CFG 4) with the shipped classifier;
#      the shipped weights came from TRAIN_MIN=4 (docs/EMBEDDED.md);
#   2. `dqar bench` DiT-XL/2-256 with random weights at batch 8, then at batches 1 and 32; the rows include the
#      graph executor (noreuse_graph, <preset>_graph: one CUDA graph per plan row, compile + capture in their stats).
# Each stage has its own time limit, so one slow stage does not cost the others.
# Usage: OUT=results/gpu bash benchmarks/gpu_session.sh
# Smoke run on a CPU: OUT=/tmp/s DEVICE=cpu TRAIN_MIN=0.1 PER_CLASS=1 MODEL=embedded STEPS=4 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-results/gpu}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
TRAIN_MIN=${TRAIN_MIN:-0}
PER_CLASS=${PER_CLASS:-100}
MODEL=${MODEL:-random-dit-xl2}
STEPS=${STEPS:-50}
PY=${PY:-python3}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

stage() { echo "== $(date -u +%H:%M:%S) $*"; }

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$TRAIN_MIN" != 0 ]; then
stage train the embedded DiT
mkdir -p "$OUT/emb/transformer"
timeout $((${TRAIN_MIN%.*} * 60 + 60)) $PY -m dqar.embedded.train --out "$WORK/emb" --minutes "$TRAIN_MIN" --batch-size 256 \
    --seed 0 --device "$DEVICE" --data "$DATA" --no-progress 2>&1 | grep -v "^step" ; tail -c 400 "$WORK/emb/train_log.json"
cp "$WORK/emb/transformer/"* "$OUT/emb/transformer/" && cp "$WORK/emb/train_log.json" "$OUT/emb/"

stage quality check
cp dqar/embedded/weights/classifier.* dqar/embedded/weights/fmnist_test_stats.npz "$WORK/emb/"
timeout 60 $PY -m dqar.embedded.check --folder "$WORK/emb" --per-class "$PER_CLASS" --device "$DEVICE" | tee "$OUT/check.json"
fi

stage bench batch 8
timeout 290 $PY -m dqar.cli bench --model "$MODEL" --device "$DEVICE" --batch-sizes 8 --presets scheduling_only quant_cache_only full_dqar block_reuse --steps "$STEPS" --out "$WORK/b8" --quiet
cp "$WORK/b8/bench.json" "$OUT/bench_b8.json"

stage bench batch 1 and 32
timeout 150 $PY -m dqar.cli bench --model "$MODEL" --device "$DEVICE" --batch-sizes 1 32 --presets full_dqar block_reuse --steps "$STEPS" --out "$WORK/b132" --quiet
cp "$WORK/b132/bench.json" "$OUT/bench_b1_b32.json"
stage done
