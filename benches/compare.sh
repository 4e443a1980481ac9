#!/usr/bin/env bash
# End-to-end comparisons.
#   benches/compare.sh [local|remote|all]  devsync vs cp -a and rsync (local, and over SSH+TLS)
#   benches/compare.sh big                 1 GiB three-edit delta only, local (with --inplace)
#   benches/compare.sh bigremote           the same through OpenSSH behind a TLS gateway, vs rsync
#   benches/compare.sh reflink             the same on loop-mounted XFS, btrfs and ext4 images,
#                                          locally and through OpenSSH (FS=, PATHS=, ROUNDS=)
#   benches/onefile.py, benches/rtt.py     one-file push cold vs kept; round trips through a delaying relay
#   benches/compare.sh cp                  devsync cp vs scp through an openssl ProxyCommand
#   benches/compare.sh shaped              devsync push vs rsync -az/-a over a tc-shaped link
#                                          (own netns; RATES="20mbit 100mbit", ROUNDS=3)
# Data in $BENCH_DIR (default /tmp/devsync-bench); RUNS=5 / ROUNDS=5 rounds, tools alternating.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
if [ "${1:-}" = cp ]; then
  exec python3 benches/cp.py
fi
if [ "${1:-}" = bigremote ]; then
  exec python3 benches/bigdelta.py
fi
if [ "${1:-}" = reflink ]; then
  exec python3 benches/reflink.py
fi
if [ "${1:-}" = shaped ]; then
  exec python3 benches/shaped.py
fi
exec python3 benches/compare.py "$@"
