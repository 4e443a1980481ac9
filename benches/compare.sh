#!/usr/bin/env bash
# End-to-end comparison of devsync with cp -a and rsync on local directories.
# Usage: benches/compare.sh [local|remote|all]   (data in $BENCH_DIR, default /tmp/devsync-bench; RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 benches/compare.py "$@"
