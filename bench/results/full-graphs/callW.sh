# Call W (base-weights-on-cuda-graphs.patch applied): every single-GPU test, then where a full step on graphs goes.
source .gpu/prelude.sh
timeout 360 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py tests/gpu/test_generation.py > $OUT/tests.log 2>&1
grep -E "^E  |passed|failed|^FAILED|^ERROR" $OUT/tests.log | head -30
timeout 150 python3 bench/train_speed.py --shape 1b --tokenizer .gpu/tok --results /tmp --variants weitiao:full:kprof > $OUT/kprof-full-graphs.log 2>&1
grep -E "per step|Self CUDA time total|tok/s" $OUT/kprof-full-graphs.log
