#!/usr/bin/env bash
# The trainer's device check, on a machine with a CUDA GPU, after `make gpu-prepare` here
# (it fills .gpu/, which this run carries). One prepared script, in parts, most important first:
#   stages  every sub-stage in bf16 on CUDA from the demo shards, chained as --init chains
#           them, then stage 1.3 with FSDP on the one GPU and with packing (bench/gpu_stages.py)
#   siglip  bench/bench_train.py: a Qwen2-0.5B-shaped LLM with a SigLIP-so400m-shaped tower,
#           8 packed rows of 2048 tokens a step: the loader against in-memory batches and the
#           LLM alone (data wait, tokens/s, samples/s, peak memory)
#   intern  the same with an InternViT-300M-shaped tower
#   fsdp    the siglip case under FSDP on the one GPU
#
#   bash bench/gpu_checks.sh [PART ...]        (default: every part)
# Logs and JSON go to $OUT (the device run's output folder) or /tmp/gpu-out.
set -uo pipefail
OUTDIR=${OUT:-/tmp/gpu-out}
mkdir -p "$OUTDIR"
parts=${*:-stages siglip intern fsdp}
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUTDIR/env.log"
bench=(python3 bench/bench_train.py --device cuda --preset qwen2-0.5b --batch-size 8 --max-len 2048
       --pack --num-workers 4 --steps 30 --corpus .gpu/bench)
status=0
for part in $parts; do
    echo "== $part ($(date +%T))"
    case $part in
        stages) timeout 300 python3 bench/gpu_stages.py .gpu/demo --results "$OUTDIR/stages.json" ;;
        siglip) timeout 300 "${bench[@]}" --tower siglip-so400m ;;
        intern) timeout 300 "${bench[@]}" --tower internvit-300m ;;
        fsdp)   timeout 300 "${bench[@]}" --tower siglip-so400m --fsdp ;;
        *) echo "unknown part $part"; false ;;
    esac 2>&1 | tee "$OUTDIR/$part.log"
    rc=${PIPESTATUS[0]}
    echo "== $part: exit $rc"
    [ "$rc" = 0 ] || status=1
done
exit $status
