#!/usr/bin/env bash
# Run commands side by side and report each one's output whole, in order, once all have ended.
#   usage: scripts/side-by-side.sh NAME 'COMMAND' [NAME 'COMMAND' ...]
# Each command's output goes to .run/<NAME>.log while it runs; the exit status is non-zero if
# any command failed. `make test` uses it for test sessions that start their own servers (on
# free loopback ports, under their own temporary directories) and spend most of their time
# waiting out outages, so that two of them take little longer than the longer one.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p .run
names=()
pids=()
while [ $# -ge 2 ]; do
  names+=("$1")
  bash -c "$2" >".run/$1.log" 2>&1 &
  pids+=("$!")
  shift 2
done
rc=0
for i in "${!names[@]}"; do
  if wait "${pids[$i]}"; then status=passed; else status=FAILED; rc=1; fi
  echo "== ${names[$i]}: $status (output from .run/${names[$i]}.log)"
  cat ".run/${names[$i]}.log"
done
exit $rc
