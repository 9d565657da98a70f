#!/bin/bash
# Bit-for-bit check of behaviour across commits: every method (and the scan and dec stages) trained
# 2 epochs on digits, one thread, seed 0; prints the sha256 prefix of labels.npy and embeddings.npy.
#   benchmarks/reproduce_digits.sh SRC_CHECKOUT OUT_DIR     (SRC_CHECKOUT: e.g. a `git worktree` of a base)
# Run it on two checkouts and compare the lines.
SRC=${1:?checkout}; OUT=${2:?out dir}; PY=${PYTHON:-python}
mkdir -p "$OUT"
for m in instance and pcp deepcluster pad dccm jule instance+scan instance+dec; do
  meth=${m%%+*}; extra=()
  [ "$m" != "$meth" ] && extra=(--cluster-head "${m#*+}" --set "${m#*+}.epochs=2")
  rm -rf "${OUT:?}/$m"
  PYTHONPATH="$SRC/src" OMP_NUM_THREADS=1 "$PY" -m deepclust fit --data digits --method "$meth" --epochs 2 \
    --n-clusters 10 --seed 0 --threads 1 --no-progress --out "$OUT/$m" "${extra[@]}" > "$OUT/$m.log" 2>&1
  echo "$m rc=$? $(sha256sum "$OUT/$m/labels.npy" 2>/dev/null | cut -c1-16) $(sha256sum "$OUT/$m/embeddings.npy" 2>/dev/null | cut -c1-16)"
done
