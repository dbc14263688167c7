#!/usr/bin/env bash
# The GPU figures, one part per call (each well under 10 minutes on one H100):
#
#   bash benchmarks/gpu.sh tests|encode|classifiers|classifiers-compiled|audit|diffusion|score [OUT]
#
# Each part appends its commands, their output and exit codes to OUT/gpu-PART.log (OUT: the second
# argument, else $OUT, else runs/gpu), writes its JSON there, and prints the log at the end. Assets:
# TAEF2's encoder and BreastMNIST from ../shared, or from .assets/ where a run copied them.
set -u
part=${1:?usage: bash benchmarks/gpu.sh tests|encode|classifiers|classifiers-compiled|audit|diffusion|score [OUT]}
out=${2:-${OUT:-runs/gpu}}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu-$part.log"

asset() {  # the first of the given paths that exists
    for f in "$@"; do [ -f "$f" ] && { echo "$f"; return 0; }; done
    echo "benchmarks/gpu.sh: none of $* exists; copy it there" >&2
    exit 2
}
step() {  # step LIMIT_SECONDS COMMAND...: run it under a time limit, logged
    local limit=$1
    shift
    echo "=== $* (limit ${limit} s, $(date +%T))" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== rc $?" >>"$log"
}

case $part in
tests)  # the tests that skip without CUDA (autocast, CUDA graphs, no per-step synchronisation)
    step 540 "$py" -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" tests ;;
encode)  # goal: pipeline overhead <= 10% at 128 and 512 px
    taef2=$(asset ../shared/weights/taef2/taef2_encoder.pth .assets/taef2_encoder.pth) || exit 2
    step 120 "$py" benchmarks/encode.py --autoencoder "taesd:$taef2" --size 128 --repeats 5 --profile
    step 90 "$py" benchmarks/encode.py --autoencoder "taesd:$taef2" --size 128 --repeats 5 --n 8192 --dataset synthetic:n_train=8192,n_val=0,n_test=0
    step 300 "$py" benchmarks/encode.py --autoencoder "taesd:$taef2" --size 512 --repeats 3 ;;
classifiers)  # goal: the latent model's best >= 0.9 of its bare backbone's best; every point kept
    step 560 "$py" -m medlatent bench classifiers --sweep-compile off --json "$out/bench-classifiers-eager.json" ;;
classifiers-compiled)
    step 560 "$py" -m medlatent bench classifiers --sweep-precision bf16 --sweep-compile on --json "$out/bench-classifiers-compiled.json" ;;
audit)  # goal: training throughput inside the audit >= 0.8 of the bare step (results.json: training_throughput)
    taef2=$(asset ../shared/weights/taef2/taef2_encoder.pth .assets/taef2_encoder.pth) || exit 2
    breast=$(asset ../shared/data/medmnist/breastmnist.npz .assets/breastmnist.npz) || exit 2
    step 400 "$py" -m medlatent gap --quiet --dataset "medmnist:$breast" --size 64 --backbone resnet18 --epochs 30 --seed 0 --seed 1 --seed 2 \
        --autoencoder "taesd:$taef2" --out "$out/gap-breastmnist"
    step 30 "$py" -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps(r['training_throughput'], indent=1))" "$out/gap-breastmnist/results.json" ;;
diffusion)  # engine step (EMA included) vs bare UNet step; samplers; the diffusion classifier's images/s
    step 280 "$py" -m medlatent bench diffusion --preset small --batch-size 128 --json "$out/bench-diffusion-small.json"
    step 280 "$py" -m medlatent bench diffusion --preset base --batch-size 256 --json "$out/bench-diffusion-base.json" ;;
score)  # the latent scorer, copies included, CUDA graphs off and on
    step 400 "$py" benchmarks/score.py ;;
*)
    echo "benchmarks/gpu.sh: unknown part '$part'; use tests, encode, classifiers, classifiers-compiled, audit, diffusion or score" >&2
    exit 2 ;;
esac
cat "$log"
