#!/usr/bin/env bash
# The GPU check of the Triton training parts: their CUDA checks, an A/B of each, and the final
# comparison against compiled transformers. Two parts, run back to back on a lent machine (it is
# released after 30 s idle):  bash benchmarks/gpu_train_check.sh 1   then   ... 2
# Results go to $OUT (the device tool's folder), or to a fresh temporary folder.
#   1: the Triton kernels' checks on CUDA (eager and one fullgraph-compiled model), then an A/B of
#      the new parts without coordinate-descent tuning (fast compiles): ~5 min
#   2: everything the A/B shows faster, with coordinate-descent tuning (the default), against
#      hf-compile, and a profile: ~4 min.  VARIANT=... overrides the slm variant of part 2.
OUT=${OUT:-$(mktemp -d)}; echo "results in $OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src TORCHINDUCTOR_COMPILE_THREADS=16
# train_speed.py appends its results there too (benchmarks/results/train_speed_gpu.jsonl is where they belong)
export SLM_RESULTS_DIR=$OUT/results
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$1" = 1 ]; then
  timeout 170 python3 - <<'PY'
import ast, subprocess, sys
src = open('tests/kernels/test_cross_entropy_triton.py').read()
checks = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body
          if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '').startswith('CHECK')}
for name, check in checks.items():
    r = subprocess.run([sys.executable, '-c', check, 'cuda'], capture_output=True, text=True, timeout=80)
    print(name, 'on cuda: rc', r.returncode, r.stdout.strip()[-200:], r.stderr[-2500:] if r.returncode else '', flush=True)
PY
  timeout 330 python3 benchmarks/train_speed.py gpu --log $OUT/gpu_ab.jsonl --steps 15 \
    --variants slm-compile+nocoord,slm-compile+nocoord+linearce,slm-compile+nocoord+glu,slm-compile+nocoord+rope,slm-compile+nocoord+linearce+glu+rope \
    2>$OUT/ab_err.txt | tee $OUT/gpu_ab.txt
  echo "A/B rc $?"; grep -v "^W11\|^ *$" $OUT/ab_err.txt | tail -8
else
  V=${VARIANT:-slm-compile+linearce+glu+rope}
  timeout 400 python3 benchmarks/train_speed.py gpu --log $OUT/gpu_speed.jsonl --variants $V,hf-compile \
    --profile $V --profile-out $OUT/profile.txt 2>$OUT/bench_err.txt | tee $OUT/gpu_speed.txt
  echo "bench rc $?"; grep -v "^W11\|^ *$" $OUT/bench_err.txt | tail -8
fi
