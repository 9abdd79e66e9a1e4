# Call V (with base-weights-on-cuda-graphs.patch applied): full and freeze fine-tuning on CUDA graphs: GPU tests, then
# 1B full fine-tuning with and without graphs and TRL's fastest full row, one call (~8 min).
source .gpu/prelude.sh
timeout 170 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_cuda.py -k "train_base_weights_to_the_eager or full_fine_tuning_with_master" > $OUT/tests.log 2>&1
grep -E "^E |^losses|eval loss|passed|failed|Error|train.cuda_graphs" $OUT/tests.log | head -20
mkdir -p /tmp/res
i=0
for v in "weitiao:full" "trl:full:varlen" "weitiao:full:nographs"; do
  i=$((i+1))
  echo "=== $v" | tee -a $OUT/bench.log
  timeout 110 python3 bench/peers.py --shape 1b --tokenizer .gpu/tok --tag V-$i --results /tmp/res --variants $v > /tmp/res/row-$i.log 2>&1
  grep -E "cuda_graphs|Traceback|train.cuda_graphs" /tmp/res/row-$i.log | head -3 | tee -a $OUT/bench.log
  tail -1 /tmp/res/row-$i.log | tee -a $OUT/bench.log
done
cp /tmp/res/peers-*.json $OUT/ 2>/dev/null
