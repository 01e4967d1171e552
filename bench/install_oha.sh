#!/usr/bin/env bash
# Builds the `oha` HTTP load generator (Rust, from crates.io) used by
# bench/bench_serving.py, into the feedbeam cache. Idempotent: does nothing
# when the pinned version is already there. Needs cargo on the PATH.
#
#   bash bench/install_oha.sh        # prints the binary's path
set -euo pipefail
OHA_VERSION="${OHA_VERSION:-1.16.0}"
CACHE_DIR="${FEEDBEAM_CACHE_DIR:-$HOME/.cache/feedbeam}"
ROOT="$CACHE_DIR/oha-$OHA_VERSION"
BIN="$ROOT/bin/oha"
if [[ ! -x "$BIN" ]]; then
  command -v cargo >/dev/null || { echo "install_oha: cargo is not on the PATH" >&2; exit 1; }
  # --locked: the crate's own lock file, so the build is reproducible.
  cargo install oha --version "$OHA_VERSION" --locked --root "$ROOT" -j 1 >&2
fi
echo "$BIN"
