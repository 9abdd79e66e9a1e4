#!/usr/bin/env bash
# The whole proof, from the repository root: bash examples/pt_vocab_zh/run.sh   (about 3 min on an H100; the 300
# training steps take hours on 2 CPU cores: add --max_steps 30 to the train line there for a first look)
# Needs the shared real data (../shared/data or $WEITIAO_SHARED_DATA). Everything is written under outputs/pt_vocab_zh.
set -euo pipefail
OUT=outputs/pt_vocab_zh
mkdir -p $OUT
python examples/pt_vocab_zh/prepare.py --out $OUT/data
weitiao vocab extend --model default --corpus $OUT/data/train.jsonl --eval $OUT/data/held_out.jsonl \
    --add 2000 --min-frequency 5 --out $OUT/zh-extended
python examples/pt_vocab_zh/measure.py --model default --eval $OUT/data/held_out_small.jsonl --generate \
    > $OUT/base.json
weitiao train examples/pt_vocab_zh/pt.yaml
python examples/pt_vocab_zh/measure.py --model $OUT/zh-extended --adapter $OUT/pt \
    --eval $OUT/data/held_out_small.jsonl --generate > $OUT/after.json
cat $OUT/base.json $OUT/after.json
