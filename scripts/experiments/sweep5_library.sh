#!/usr/bin/env bash
# Sweep 5: the recipe through the project trainer (docs/experiments.md, "Library path").
# FEATS: a `uniembed extract` dir of mobilenetv2/avg over both labels.csv files (uniembed prepare first).
set -e
FEATS=${FEATS:?set FEATS to a mobilenetv2 avg feature dir}
L=".venv/bin/python scripts/experiments/library_check.py --features $FEATS"
OLD="--set loss.centers_init_std=0 --set loss.distill_center=false --set loss.distill_weight=10"
$L $OLD --out /tmp/research/libruns
$L $OLD --set optim.centers_lr_mult=1000 --out /tmp/research/libruns_c1000
$L $OLD --set optim.centers_lr_mult=1000 --set loss.margin_weight=0.03 --out /tmp/research/libruns_A
$L $OLD --set optim.centers_lr_mult=1000 --set schedule.warmup_epochs=5 --out /tmp/research/libruns_B
$L $OLD --set optim.lr=1e-4 --out /tmp/research/libruns_C
$L $OLD --set optim.lr=1e-4 --set loss.margin_weight=1.0 --out /tmp/research/libruns_D
$L --set loss.distill_center=false --set loss.distill_weight=10 --out /tmp/research/libruns_final
$L --set loss.distill_center=false --set loss.distill_weight=10 --set loss.margin_weight=1.0 --out /tmp/research/libruns_E
$L --set loss.distill_weight=10 --out /tmp/research/libruns_final2
$L --out /tmp/research/libruns_G            # configs/model.yaml as shipped
$L --set seed=1 --out /tmp/research/libruns_seed1
