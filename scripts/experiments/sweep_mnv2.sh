#!/usr/bin/env bash
# Sweep 1: MobileNetV2 avg-pooled features (cache: cache_features.py --backbone mobilenetv2 --size 224).
set -e
U=".venv/bin/python scripts/experiments/universality.py --feats mobilenetv2-224"
$U --method raw --name "mnv2 avg: raw 1280 (L2)"
$U --method pca --name "mnv2 avg: PCA-64"
$U --method pcaw --whiten 1 --name "mnv2 avg: PCA-whiten-64"
$U --method pcaw --whiten 0.5 --name "mnv2 avg: PCA-64, half-whitened (power 0.5)"
$U --init random --arc-w 1 --name "mnv2 avg: ArcFace only, random init (the specialising head)"
$U --init pca --arc-w 1 --name "mnv2 avg: ArcFace only, PCA init"
$U --init pca --arc-w 0 --kd-w 1 --kd kl --name "mnv2 avg: distill only (KL, centred teacher), PCA init"
$U --init pca --arc-w 0 --kd-w 1 --kd mse --kd-center 0 --name "mnv2 avg: distill only (MSE, uncentred = library), PCA init"
$U --init pca --arc-w 0.1 --kd-w 1 --kd kl --name "mnv2 avg: ArcFace 0.1 + KL distill 1, PCA init"
$U --init pca --arc-w 0.3 --kd-w 1 --kd kl --name "mnv2 avg: ArcFace 0.3 + KL distill 1, PCA init"
$U --init pca --arc-w 1 --kd-w 1 --kd kl --name "mnv2 avg: ArcFace 1 + KL distill 1, PCA init"
$U --init pca --arc-w 0.1 --kd-w 10 --kd mse --kd-center 0 --name "mnv2 avg: ArcFace 0.1 + MSE distill 10 (library form), PCA init"
