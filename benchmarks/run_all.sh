#!/usr/bin/env bash
# Every benchmark behind the README's tables, in sequence (about an hour on the 2-core CPU).
# Usage: bash benchmarks/run_all.sh   (from the repository root, with .venv installed)
set -uo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
for data in digits usps mnist-test "fashion-mnist --split test --tag test"; do
  for base in kmeans-pixels spectral-pixels; do
    $PY accuracy.py --method $base --data $data
  done
done
$PY throughput.py
for pair in "digits digits" "mnist-test mnist" "usps usps" "fashion-mnist fashion-mnist"; do
  set -- $pair
  extra=""; [ "$1" = fashion-mnist ] && extra="--split test --tag test"
  for method in and instance; do
    $PY accuracy.py --method $method --data $1 --config $method-$2 $extra
  done
done
$PY spectral_scale.py
$PY spectral_scale.py --features fashion-mnist
$PY cluster_heads.py
$PY report.py
