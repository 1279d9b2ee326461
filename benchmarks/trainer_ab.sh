#!/usr/bin/env bash
# The trainer's step time at an earlier commit against the working tree: `falign train` for fa and dfa (MLP
# 256-256 on 10,000 Fashion-MNIST images, 2 epochs, one thread on core 0), interleaved, RUNS times each; prints
# the second epoch's seconds (313 steps and the test evaluation) per run.
# Usage: bash benchmarks/trainer_ab.sh REV [RUNS]     (e.g. REV=c640b16; needs Fashion-MNIST installed)
set -euo pipefail
rev=${1:?give the earlier commit}; runs=${2:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
old=$(mktemp -d); work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$old" "$rev"
for i in $(seq "$runs"); do
  for rule in fa dfa; do
    for v in old new; do
      if [ "$v" = old ]; then src=$old/src; else src=$repo/src; fi
      PYTHONPATH=$src OMP_NUM_THREADS=1 taskset -c 0 python -c "from falign_cli import main; main()" train \
        --rule "$rule" --data fashion-mnist --train-subset 10000 --hidden 256,256 --epochs 2 --scale-every 0 \
        --no-progress --out "$work/$v-$rule-$i" >/dev/null
      python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(sys.argv[2], sys.argv[3], \
round(r[-1]['seconds'] - r[0]['seconds'], 3))" "$work/$v-$rule-$i/timing.jsonl" "$v" "$rule"
    done
  done
done
