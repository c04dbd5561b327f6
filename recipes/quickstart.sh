#!/usr/bin/env bash
# The main job on the built-in synthetic world, as a pipeline of the real subcommands:
# world -> train std / picnn / cdcnn-r1p2 (train-gated's defaults) -> evaluate entanglement -> saliency with evaluation
# -> Network Dissection on the world's Broden export -> TCAV on the planted concept -> report.
# Usage: bash recipes/quickstart.sh [OUT]   (OUT defaults to runs/quickstart)
# The evaluation, saliency and TCAV steps read the data each checkpoint was trained on.
# Smaller numbers for CI: QUICKSTART_IMAGES, QUICKSTART_EPOCHS, QUICKSTART_BRODEN and
# QUICKSTART_BACKBONE (env vars; the test suite runs it with smallcnn).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe="$here/quickstart.yaml"
out=${1:-runs/quickstart}
images=${QUICKSTART_IMAGES:-2000}
epochs=${QUICKSTART_EPOCHS:-6}
broden=${QUICKSTART_BRODEN:-240}
backbone=${QUICKSTART_BACKBONE:-resnet18}
# concept folders come from the same world without the planted correlations, class-balanced,
# so that random images carry red-c at its base rate (see the TCAV notes in README.md)
neutral="synthetic"
world="synthetic:n=$images,ntest=$((images / 4)),correlate=red-c@circle=0.9"
cx() { echo "+ cnnexplain $*" >&2; cnnexplain "$@"; }

mkdir -p "$out"
[ -d "$out/broden" ] || cx data synth --format broden --world "$world" --num-images "$broden" --out "$out/broden" --quiet
[ -d "$out/concepts" ] || cx data synth --format concepts --world "$neutral" --concepts red-c,stone --per-concept 40 --random-sets 6 --out "$out/concepts" --quiet
for method in std picnn cdcnn-r1p2; do
  run="$out/$method"
  cx train-gated --recipe "$recipe" --dataset "$world" --method "$method" --backbone "$backbone" --epochs "$epochs" --out "$run"
  cx evaluate-entanglement --recipe "$recipe" --checkpoint "$run/best.pt" --out "$run"
done
for method in std picnn; do
  run="$out/$method"
  methods=$([ "$method" = std ] && echo gradient,smoothgrad,integrated-gradients,gradcam,lrp-zplus,clrp2 \
            || echo gradient,smoothgrad,integrated-gradients,gradcam,gated-cam,gated-cam-complement,lrp-zplus,clrp2)
  cx saliency --recipe "$recipe" --checkpoint "$run/best.pt" --methods "$methods" --out "$run"
  cx dissect --recipe "$recipe" --checkpoint "$run/best.pt" --broden "$out/broden" --out "$run"
  cx tcav --recipe "$recipe" --checkpoint "$run/best.pt" --concepts "$out/concepts" --concept red-c,stone --out "$run"
done
cx report "$out/std" "$out/picnn" "$out/cdcnn-r1p2" --out "$out" --quiet
echo "$out/report/index.html"
