#!/usr/bin/env bash
# Sweep 2: MobileNetV2 pooling / stages, and heads with more capacity (cache: mobilenetv2-224).
set -e
U=".venv/bin/python scripts/experiments/universality.py --feats mobilenetv2-224"
$U --keys gem --method raw --name "mnv2 GeM: raw 1280 (L2)"
$U --keys gem --method pca --name "mnv2 GeM: PCA-64"
$U --keys avg+s1+s2+s3 --method raw --name "mnv2 avg+3 stages (block-normed): raw 1856"
$U --keys avg+s1+s2+s3 --method pca --name "mnv2 avg+3 stages (block-normed): PCA-64"
$U --init pca --arc-w 0 --kd-w 1 --kd kl --lr 1e-2 --epochs 100 --name "mnv2 avg: KL distill only, lr 1e-2, 100 ep"
$U --hidden 1024 --arc-w 0.1 --kd-w 1 --kd kl --lr 1e-3 --epochs 60 --name "mnv2 avg: MLP 1024 head, ArcFace 0.1 + KL distill 1, 60 ep"
$U --init pca --arc-w 0.1 --kd-w 1 --kd kl --balance domain+class --name "mnv2 avg: ArcFace 0.1 + KL 1, PCA init, domain+class balanced"
