#!/usr/bin/env bash
# Every benchmark, one after the other, each printing the ratios it measured in its own run.
# Takes roughly an hour on 2 CPU cores (DAVIS masks and the linear probe's pre-training
# dominate). Real data is read from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for bench in colour_encoding core_step distributed_step prep_memory davis_masks linear_probe; do
  echo "=== benchmarks/$bench.py"
  python "benchmarks/$bench.py"
done
