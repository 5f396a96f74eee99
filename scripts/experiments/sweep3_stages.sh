#!/usr/bin/env bash
# Sweep 3: multi-stage MobileNetV2 features; does per-stage L2 normalisation matter? heads on top.
set -e
U=".venv/bin/python scripts/experiments/universality.py --feats mobilenetv2-224"
$U --keys avg+s1+s2+s3 --blocknorm 0 --method pca --name "mnv2 avg+3 stages, plain concat (no block norm): PCA-64"
$U --keys avg+s3 --method pca --name "mnv2 avg+stride-16 stage (block-normed): PCA-64"
$U --keys avg+s1+s2+s3 --init pca --arc-w 0.1 --kd-w 1 --kd kl --name "mnv2 avg+3 stages (block-normed): ArcFace 0.1 + KL 1, PCA init"
$U --keys avg+s1+s2+s3 --init pca --arc-w 0.1 --kd-w 10 --kd mse --kd-center 0 --name "mnv2 avg+3 stages (block-normed): ArcFace 0.1 + MSE distill 10, PCA init"
$U --keys avg+s1+s2+s3 --init pca --arc-w 1 --kd-w 10 --kd mse --kd-center 0 --name "mnv2 avg+3 stages (block-normed): ArcFace 1 + MSE distill 10, PCA init"
