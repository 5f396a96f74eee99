#!/usr/bin/env bash
# Sweep 4: EfficientNet-Lite0 (cache: cache_features.py --backbone efficientnet_lite0 --size 224).
set -e
U=".venv/bin/python scripts/experiments/universality.py --feats efficientnet_lite0-224"
$U --method raw --name "lite0 avg: raw 1280 (L2)"
$U --method imnet --name "lite0 avg: ImageNet-classifier subspace 64 (data-free projection)"
$U --method pca --name "lite0 avg: PCA-64"
$U --keys avg+s1+s2+s3 --method raw --name "lite0 avg+3 stages (block-normed): raw 1960"
$U --keys avg+s1+s2+s3 --method pca --name "lite0 avg+3 stages (block-normed): PCA-64"
$U --init pca --arc-w 0.1 --kd-w 10 --kd mse --kd-center 0 --name "lite0 avg: ArcFace 0.1 + MSE distill 10, PCA init"
$U --init imnet --arc-w 0.1 --kd-w 10 --kd mse --kd-center 0 --name "lite0 avg: ArcFace 0.1 + MSE distill 10, ImageNet-subspace init"
