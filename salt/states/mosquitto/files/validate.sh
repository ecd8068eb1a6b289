#!/bin/bash
# Managed by Salt (Tributary). Validate a candidate mosquitto.conf by starting a broker with it
# on scratch loopback ports, with persistence, logging and bridges pointed at harmless
# places, before the real broker is restarted with it.
#   usage: mosquitto-validate <mosquitto binary> <timeout s> <candidate conf>
set -u
bin=$1; timeout=$2; conf=$3
work=$(mktemp -d /tmp/mosquitto-validate.XXXXXX)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

attempt() {  # $1: first scratch port - 1; returns 0 valid, 1 invalid, 2 port clash
  local base=$1 first=$(( $1 + 1 ))
  # listener <port> [address] -> listener <scratch port> 127.0.0.1; bridge addresses -> a
  # closed loopback port (the bridge must not take over the real bridge's session upstream).
  awk -v base="$base" '
    /^[ \t]*listener[ \t]/ { n++; print "listener " (base + n) " 127.0.0.1"; next }
    /^[ \t]*(port|pid_file|log_dest|persistence_location|persistence|autosave_interval)[ \t]/ { next }
    /^[ \t]*(address|addresses)[ \t]/ { print "address 127.0.0.1:9"; next }
    { print }
    END { print "persistence false"; print "log_dest stderr" }
  ' "$conf" > "$work/mosquitto.conf"
  "$bin" -c "$work/mosquitto.conf" > "$work/out" 2>&1 &
  pid=$!
  local deadline=$(( SECONDS + timeout ))
  while (( SECONDS < deadline )); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null; pid=
      grep -q "Address already in use" "$work/out" && return 2
      return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$first") 2>/dev/null; then
      sleep 0.3   # grace for anything loaded after the listeners
      kill -0 "$pid" 2>/dev/null && return 0
      continue
    fi
    sleep 0.1
  done
  echo "mosquitto did not listen on scratch port $first within ${timeout}s" >> "$work/out"
  return 1
}

for _ in 1 2 3; do
  attempt $(( 20000 + RANDOM % 20000 )); rc=$?
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=; }
  case $rc in
    0) echo "configuration valid (scratch broker started)"; exit 0 ;;
    1) echo "mosquitto refused the configuration:" >&2; cat "$work/out" >&2; exit 1 ;;
  esac
done
echo "no free scratch port found" >&2; cat "$work/out" >&2; exit 1
