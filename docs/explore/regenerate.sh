#!/usr/bin/env bash
# Regenerates the images and the sweep table of README.md's "Exploring designs" section (CPU; the
# sweep's 20 training runs took 55 minutes on a 2-core machine under a load of 10-12, and an interrupted
# sweep resumes where it stopped). Run from the repository root.
set -euo pipefail
# One thread per process: on a machine shared by other jobs, more threads than free cores made each
# training step of pico several times slower (about 10x at a load average of 9 on 2 cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
overlock diagram xt -o docs/explore/xt-diagram.png
# pico with Focus-Net's ContMix kernel at 7 (at 32 px Focus-Net runs on 2x2 and 1x1 maps, which ContMix
# resizes to the kernel size: 13 made every step several times dearer for nothing). The grid: the first
# Base-Net stage 8..128 wide, Focus-Net's first stage 1 or 2 blocks, with and without the gate. Each
# variant trains 2 epochs (178 steps of 16) on the bundled digits at 32 px; FLOPs are counted at 32 px.
SWEEP=(pico --set focus.stages.0.kernel_size=7 --grid base.stages.0.width=8,16,32,64,128
  --grid focus.stages.0.depth=1,2 --grid context.gate=true,false --input-size 32
  --train digits --epochs 2 --batch-size 16 --out sweeps/pico-readme)
overlock sweep "${SWEEP[@]}" --plot docs/explore/pico-sweep.png
overlock sweep "${SWEEP[@]}" --json | python docs/explore/sweep_table.py README.md  # all reused: the table only
overlock erf pico --layer base.stages.1 --input-size 96 --images 4 -o docs/explore/pico-erf.png
