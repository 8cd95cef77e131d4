#!/usr/bin/env bash
# Issue 8's GPU bars in one call on a lent device: four trainings share the one GPU.
#
#   bash bench/robustness_gpu.sh OUT [DEVICE] [BUDGET] [DATA] [bars|ablation|confirm|seeds|third]
#
# bars (the default set):
#   default_ab  default config, train gbm40_he      -> (a) cpm15 with pixel sizes, (b) without
#   default_c   default config, train gbm40 + cpm15 -> (c) dsb2018 brightfield tiles
#   hed003_a    augment.hed_jitter=0.03 (the old default)  -> (a)
#   nonorm_a    preprocess.stain_norm=none                 -> (a)
#   tta_ab      default_ab's model scored again with flip TTA
# ablation (what might stop source-lab overfitting; all scored on (a)), each on top of the
# defaults the ablation started from (zoom 0.8-1.25 p 0.3, blur p 0.1, weight decay 1e-4):
#   seed1_ab    train.seed=1 (seed spread), also (b)
#   short_a     800 steps instead of BUDGET (the CPU runs lost (a) quality with training length)
#   r18_a       encoder resnet18 (less capacity)
#   wd_a        weight_decay 0.01 (AdamW's usual value)
#   geo_a       scale_range 0.5-2, scale_p 0.5, blur_p 0.3 (resampled, blurrier tiles)
# confirm (the third session's training defaults, the fourth session's scale estimate; the
# fifth session found on the CPU that more patches from the one lab, and larger batches of
# them, lower recall on the other lab):
#   new_ab, new1_ab  defaults at batch 32, seeds 0 and 1, (a) and (b)
#   zoom_ab          new_ab's model scored again with inference.zoom=1.5 (the seventh
#                    session: +0.027 and -0.020 Dice on (a) on two CPU checkpoints,
#                    validation unchanged)
#   plain_ab         the default config as shipped: batch 8, train.max_steps, (a) and (b)
#   lr_a             batch 32 with lr 2e-3 (square-root scaling of the batch-8 rate), (a)
#   ms_ab            train.mixstyle_p=0.5 (MixStyle: +0.015-0.039 Dice on the CPU at 2,000
#                    steps, -0.05 at 4,000), (a) and (b)
#   new_c            defaults, (c)
#   small_a          resnet18 on 128-px patches, the CPU preset that met the (a) bars at
#                    1,000 CPU steps, here at the bar's budget, (a)
# seeds (the eighth session: the spread the bars sit in):
#   seed0 ... seed6  the default config exactly as shipped (batch 8, train.max_steps),
#                    seeds 0-6 (SEEDS="0 1" for fewer), (a) and (b); EXTRA="--set k=v ..."
#                    measures a change across the same seeds
#   seedN_nostain    seedN's model scored again without stain test-time augmentation
#                    (the ninth session's default: +0.03 Dice on (a) on two CPU checkpoints)
#   seedN_adapt      seedN's model scored again with inference.adapt_bn (the fifteenth
#                    session: +0.034/+0.037 and -0.052 Dice on (a) on three CPU checkpoints)
# third (the sixteenth session: does stain TTA help the shipped recipe on a third lab?):
#   c_seedN          the default config as shipped, trained on gbm40 + cpm15, scored on (c),
#                    seeds 0-6 (SEEDS for fewer)
#   c_seedN_nostain  c_seedN's model scored again without stain test-time augmentation
#
# Logs, per-image CSVs, worst-case PNGs and meta.json files end up in OUT (results.tgz).
# Wheels in .whl/ (segmentation-models-pytorch, pydantic) are installed first when present.
set -u
OUT=${1:?usage: robustness_gpu.sh OUT [DEVICE] [BUDGET] [DATA] [bars|ablation|confirm|seeds|third]}
DEV=${2:-cuda}
BUDGET=${3:-2500steps}
DATA=${4:-../shared/data}
SET=${5:-bars}
LIMIT=${LIMIT:-540}  # seconds after which every run still going is stopped
mkdir -p "$OUT"
if [ -d .whl ] && [ "$DEV" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
python3 -c "import torch, segmentation_models_pytorch as smp, pydantic
print('torch', torch.__version__, 'smp', smp.__version__, 'pydantic', pydantic.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

RUNS=$(mktemp -d /tmp/mlseg-robust-gpu.XXXX)
common=(--device "$DEV" --preset default --budget "$BUDGET" --set train.batch_size=32
        --data "$DATA" --threads 3)
n=${BUDGET%steps}  # BUDGET in steps
shipped=$(python3 -c "from mlseg.config import TrainConfig; print(TrainConfig().max_steps)") || exit 1
plain=$((n < shipped ? n : shipped))steps  # the shipped train.max_steps, at most BUDGET
run() {  # name, robustness.py arguments... (stopped at LIMIT seconds from the start)
    local name=$1; shift
    timeout $((LIMIT - SECONDS)) python3 bench/robustness.py "${common[@]}" "$@" \
        --out "$RUNS/$name" >"$OUT/$name.log" 2>&1
    echo "$name exit $?" >>"$OUT/status.log"
}
rescore() {  # name, finished run, robustness.py arguments...: its model scored again
    local name=$1 base=$2 model; shift 2
    model=$(grep -o '"model": "[^"]*"' "$OUT/$base.log" | head -1 | cut -d'"' -f4)
    [ -n "$model" ] && [ $((LIMIT - SECONDS)) -gt 60 ] && run "$name" "${MODEL_OPT:---model}" "$model" "$@"
}
smi=
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader \
        -l 20 >"$OUT/gpu.log" 2>&1 &
    smi=$!
fi
case $SET in
bars)
    {
        run default_ab --scenarios a,b
        rescore tta_ab default_ab --scenarios a,b --set inference.tta=true
    } &
    run default_c --scenarios c &
    run hed003_a --scenarios a --set augment.hed_jitter=0.03 &
    run nonorm_a --scenarios a --set preprocess.stain_norm=none &
    ;;
ablation)
    # later --set values win, so each run varies one thing of these
    common+=(--set "augment.scale_range=[0.8,1.25]" --set augment.scale_p=0.3
             --set augment.blur_p=0.1 --set train.weight_decay=0.0001)
    run seed1_ab --scenarios a,b --set train.seed=1 &
    run short_a --scenarios a --budget 800steps &
    run r18_a --scenarios a --set train.encoder=resnet18 &
    run wd_a --scenarios a --set train.weight_decay=0.01 &
    run geo_a --scenarios a --set "augment.scale_range=[0.5,2.0]" --set augment.scale_p=0.5 \
        --set augment.blur_p=0.3 &
    ;;
confirm)
    {
        run new_ab --scenarios a,b
        rescore zoom_ab new_ab --scenarios a,b --set inference.zoom=1.5
    } &
    run new1_ab --scenarios a,b --set train.seed=1 &
    run plain_ab --scenarios a,b --set train.batch_size=8 --budget "$plain" &
    run lr_a --scenarios a --set train.lr=0.002 &
    run ms_ab --scenarios a,b --set train.mixstyle_p=0.5 &
    run new_c --scenarios c &
    run small_a --scenarios a --set train.encoder=resnet18 --set train.patch_size=128 &
    ;;
seeds)
    read -ra extra <<<"${EXTRA:-}"
    for seed in ${SEEDS:-0 1 2 3 4 5 6}; do
        {
            run "seed$seed" --scenarios a,b --set train.batch_size=8 --budget "$plain" \
                --set train.seed="$seed" "${extra[@]}"
            rescore "seed${seed}_nostain" "seed$seed" --scenarios a,b \
                --set "inference.stain_tta=[1.0]"
            rescore "seed${seed}_adapt" "seed$seed" --scenarios a,b --set inference.adapt_bn=true
        } &
    done
    ;;
third)
    read -ra extra <<<"${EXTRA:-}"
    for seed in ${SEEDS:-0 1 2 3 4 5 6}; do
        {
            run "c_seed$seed" --scenarios c --set train.batch_size=8 --budget "$plain" \
                --set train.seed="$seed" "${extra[@]}"
            MODEL_OPT=--model-c rescore "c_seed${seed}_nostain" "c_seed$seed" --scenarios c \
                --set "inference.stain_tta=[1.0]"
        } &
    done
    ;;
*) echo "unknown set $SET (bars, ablation, confirm, seeds or third)"; exit 2 ;;
esac
for pid in $(jobs -p); do [ "$pid" = "$smi" ] || wait "$pid"; done
[ -n "$smi" ] && kill "$smi"
(cd "$RUNS" && find . -maxdepth 3 -not -path '*/src_*' \( -name 'per_image_*.csv' -o -name '*.png' \
    -o -name 'meta.json' -o -name 'history.csv' -o -name 'config.json' \) \
    -print0 | tar czf "$OUT/results.tgz" --null -T -)
cat "$OUT/status.log"
grep -h '^{"scenario"' "$OUT"/*.log
