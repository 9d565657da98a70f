#!/usr/bin/env bash
# Every benchmark behind the README, in sequence, then the README's generated blocks (several hours
# on the 2-core CPU: the peers alone train ClustPy's autoencoders for 100 epochs per seed).
# Usage: bash benchmarks/run_all.sh   (from anywhere, with .venv installed; ClustPy for the peers)
# Run it alone: each benchmark refuses to start (exit 2) while a deepclust fit or another benchmark
# runs. A failed step is reported at the end and the script exits 1; the others still run.
# --chosen-on says which data each run's settings were chosen on: the CPU presets and-*/instance-*
# (views "measured better on MNIST-test", spectral head on the backbone, 2K eigenvectors) were
# chosen on MNIST-test, which is report data.
set -uo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
OLD_PRESETS="mnist-test (report data)"
failed=()
run() { echo "== $*" >&2; "$@" || { echo "FAILED ($?): $*" >&2; failed+=("$*"); }; }

for data in digits usps mnist-test "fashion-mnist --split test --tag test"; do
  # shellcheck disable=SC2086
  run $PY accuracy.py --method kmeans-pixels --data $data
  # shellcheck disable=SC2086
  run $PY accuracy.py --method spectral-pixels --data $data \
      --chosen-on "$OLD_PRESETS: the spectral head's 2K eigenvectors"
done
for pair in "digits digits" "mnist-test mnist" "usps usps" "fashion-mnist fashion-mnist"; do
  set -- $pair
  extra=(); [ "$1" = fashion-mnist ] && extra=(--split test --tag test)
  for method in and instance; do
    run $PY accuracy.py --method $method --data "$1" --config "$method-$2" "${extra[@]}" --chosen-on "$OLD_PRESETS"
  done
done
run $PY throughput.py
run $PY peers.py --data usps
run $PY peers.py --data mnist-test
run $PY peers.py --data fashion-mnist --split test     # the 10,000 test images, as the accuracy table
# run $PY peers.py --data fashion-mnist                # all 70,000 images (the issue's goal; hours)
run $PY spectral_scale.py
run $PY spectral_scale.py --features fashion-mnist
run $PY cluster_heads.py
run $PY report.py
run $PY report.py --check
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
