#!/usr/bin/env bash
# The compatibility tiers of `make test`: the end-to-end and fault tests on each older Salt.
# Their virtualenvs are set up one after another (pip and the download cache are shared), then
# the tiers run side by side (scripts/side-by-side.sh): each starts its own Elasticsearch,
# brokers and Salt daemons.
#   usage: scripts/compat.sh 3007.16 3006.29
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || exit 0
runs=()
for v in "$@"; do
  make --no-print-directory setup SALT_VERSION="$v" VENV=".venv-$v"
  runs+=("compat-$v" "make --no-print-directory compat-run SALT_VERSION=$v VENV=.venv-$v")
done
exec bash scripts/side-by-side.sh "${runs[@]}"
