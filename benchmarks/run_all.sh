#!/usr/bin/env bash
# Every benchmark, one after the other, each printing the ratios it measured in its own run.
# Takes roughly 1.5 hours on 2 CPU cores (DAVIS masks, the linear probe's pre-training and
# the quick transfer curve dominate; the full curve is `python benchmarks/transfer.py`, 45 min
# more). Real data is read from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for bench in colour_encoding gpu_step shared_decode distributed_step prep_memory davis_masks linear_probe; do
  echo "=== benchmarks/$bench.py"
  python "benchmarks/$bench.py"
done
echo "=== benchmarks/transfer.py --quick"
python benchmarks/transfer.py --quick
