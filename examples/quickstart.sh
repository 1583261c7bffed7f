#!/usr/bin/env bash
# The README's main job on the bundled example data, from a fresh clone:
#   1. set up ./.venv (first run only),
#   2. check the example phantoms and train a selective ISNet on them (a background shortcut marker is
#      present in every `opacity` training image),
#   3. predict the example DICOMs, explain one of them with its lung mask,
#   4. train the standard classifier on the same data (`--variant none`, the baseline), then evaluate both
#      and audit the ISNet on phantoms whose marker is flipped (only in `normal` images): a model that
#      learned the marker fails there, an ISNet much less.
# Everything is written under runs/<name>/ (the name is printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
ISNET=.venv/bin/isnet
NAME=${ISNET_QUICKSTART_NAME:-quickstart-$(date +%Y%m%d-%H%M%S)}
RUN=runs/$NAME
DEMO=$RUN/demo

$ISNET data check examples/phantoms
$ISNET train --config models/phantom-resnet18.yaml --name "$NAME"
$ISNET train --config models/phantom-resnet18.yaml --name "$NAME-baseline" --variant none --epochs 10

mkdir -p "$DEMO"
$ISNET predict examples/dicom --model "$RUN" --out "$DEMO/predictions.csv"
$ISNET explain examples/dicom/mono1_16bit/images/00001_opacity.dcm \
  --mask examples/dicom/mono1_16bit/masks/00001_opacity.png \
  --model "$RUN" --side-by-side --out "$DEMO/heatmap.png" --raw "$DEMO/heatmap.npy"

$ISNET data synth "$DEMO/flipped" --n 100 --size 64 --bias flip --seed 7
$ISNET evaluate "$DEMO/flipped/manifest.csv" --model "$RUN" --compare "$RUN-baseline" --out "$DEMO/eval"
$ISNET audit "$DEMO/flipped/manifest.csv" --model "$RUN" --out "$DEMO/audit"

echo
echo "Done. Run folder: $RUN  (model card: $ISNET info $RUN)"
echo "Predictions: $DEMO/predictions.csv   heatmap: $DEMO/heatmap.png   audit: $DEMO/audit/audit.json"
