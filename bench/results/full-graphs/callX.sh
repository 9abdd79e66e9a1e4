# Call X (main 5cdb060): where the GPU waits for the host in a graphed step (lag),
# 1B LoRA and 1B full fine-tuning, defaults.
source .gpu/prelude.sh
for v in weitiao:lora:lag weitiao:full:lag; do
  echo "=== $v"
  timeout 140 python3 bench/train_speed.py --shape 1b --tokenizer .gpu/tok --results /tmp/lag --variants $v > $OUT/${v//:/-}.log 2>&1
  tail -45 $OUT/${v//:/-}.log | grep -v "^training\|Writing\|Loading"
done
