# Call Y: the optimizer step overlapped with the next forward pass (full fine-tuning): GPU tests, then 1B full
# fine-tuning on graphs (no overlap), TRL, eager layers with and without the overlap, and a lag table of the overlap.
source .gpu/prelude.sh
timeout 110 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_cuda.py -k "overlapped or master_adamw_steps or train_base_weights" > $OUT/tests.log 2>&1
grep -E "^E |^losses|passed|failed|Error" $OUT/tests.log | head -30
mkdir -p /tmp/res
i=0
for v in "weitiao:full" "trl:full:varlen" "weitiao:full:nographs" "weitiao:full:nographs,nooverlap"; do
  i=$((i+1))
  echo "=== $v" | tee -a $OUT/bench.log
  timeout 95 python3 bench/peers.py --shape 1b --tokenizer .gpu/tok --tag Y-$i --results /tmp/res --variants $v > /tmp/res/row-$i.log 2>&1
  grep -E "Traceback|Error" /tmp/res/row-$i.log | head -3 | tee -a $OUT/bench.log
  tail -1 /tmp/res/row-$i.log | tee -a $OUT/bench.log
done
cp /tmp/res/peers-*.json $OUT/ 2>/dev/null
timeout 80 python3 bench/train_speed.py --shape 1b --tokenizer .gpu/tok --results /tmp/lag --variants weitiao:full:lag,nographs > $OUT/lag-full-overlap.log 2>&1
tail -45 $OUT/lag-full-overlap.log | grep -v "^training\|Writing\|Loading"
