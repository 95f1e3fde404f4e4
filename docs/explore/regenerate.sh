#!/usr/bin/env bash
# Regenerates the images and the sweep table of README.md's "Exploring designs" section (CPU, ~30 min
# on a loaded 2-core machine; the sweep resumes if interrupted). Run from the repository root.
set -euo pipefail
overlock diagram xt -o docs/explore/xt-diagram.png
overlock sweep pico --grid focus.stages.0.groups=1,2,4,8,16 --grid base.stages.2.depth=1,2 \
  --grid focus.stages.0.kernel_size=7,13 --train synthetic:train=64,val=32 \
  --out sweeps/pico-readme --plot docs/explore/pico-sweep.png
overlock erf pico --layer base.stages.1 --input-size 96 --images 4 -o docs/explore/pico-erf.png
