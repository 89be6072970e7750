#!/bin/bash
# The GPU acceptance check on the lent H200 (issue 1): wheels this image lacks, then benchmarks/gpu_check.py.
set -o pipefail
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext MAX_JOBS=16
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys,torch,deepspeed,accelerate,datasets,transformers;print(sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'nccl',torch.cuda.nccl.version(),'ds',deepspeed.__version__,'acc',accelerate.__version__,'datasets',datasets.__version__,'tf',transformers.__version__,'gpu',torch.cuda.is_available())" || exit 4
echo "setup $(( $(date +%s) - t0 )) s"
timeout ${BUDGET:-520} python3 -m benchmarks.gpu_check --out $OUT/gpu_check_report.md --case-timeout ${CASE_T:-240} --work /tmp/gc 2>&1 | tee $OUT/gpu_check.log
rc=$?
echo "gpu_check exit $rc after $(( $(date +%s) - t0 )) s"
for f in /tmp/gc/*/metrics.jsonl; do [ -f "$f" ] && cp "$f" "$OUT/$(basename $(dirname $f))-metrics.jsonl"; done 2>/dev/null
ls $OUT | head -8
exit $rc
