#!/usr/bin/env bash
# One-shot set-up for a fresh Debian 12 machine (run as root or with sudo rights):
#   - Debian packages: mosquitto + clients, a JDK, Maven (only the missing ones)
#   - a virtualenv with Salt, the package and its test tools
#   - the Elasticsearch integ-test zip from Maven Central, cached outside the repo
#   - a dedicated non-root user for Elasticsearch (it refuses to run as root)
# Everything is idempotent: a second run reuses the cached downloads.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SALT_VERSION=${SALT_VERSION:-3008.5}
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ]; then CACHE=${TRIBUTARY_CACHE:-/var/cache/tributary}; else CACHE=${TRIBUTARY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tributary}; fi
ES_VERSION=${ES_VERSION:-}
ES_USER=${TRIBUTARY_ES_USER:-tributary-es}

log() { printf '[setup] %s\n' "$*" >&2; }

need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_pkgs+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_pkgs+=(mosquitto-clients)
command -v mvn >/dev/null 2>&1 || need_pkgs+=(maven)
command -v unzip >/dev/null 2>&1 || need_pkgs+=(unzip)
ls /usr/lib/jvm/*/bin/java >/dev/null 2>&1 || need_pkgs+=(openjdk-17-jdk-headless)
# Salt-state tests (tests/integration/states): Docker engine for container-mode Mosquitto
# (the image is built FROM scratch from the mosquitto package's binary: no registry).
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need_pkgs+=(docker.io)
# Fleet report tests: the page is loaded and screenshotted in a real headless Chromium.
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The packaged broker must not hold port 1883 or write to system paths during tests.
if [ -x /etc/init.d/mosquitto ] && pgrep -x mosquitto >/dev/null 2>&1; then :; fi

# Virtualenv with Salt and the package (editable, all extras).
stamp="$VENV/.tributary-stamp"
want="salt=$SALT_VERSION $(cat "$here/pyproject.toml" "$here"/scripts/overrides-salt-*.txt 2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "creating virtualenv $VENV (salt $SALT_VERSION)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # uv resolves and installs in seconds (pip took three times as long for the same set).
  "$VENV/bin/pip" install -q uv
  overrides="$here/scripts/overrides-salt-${SALT_VERSION%%.*}.txt"
  # Salt's own pins that the package index cannot meet (see the file) are overridden.
  override_args=()
  [ -f "$overrides" ] && override_args=(--override "$overrides")
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${override_args[@]}" \
    "salt==$SALT_VERSION" -e "$here[gateway,master,report,test]"
  echo "$want" > "$stamp"
fi

# Elasticsearch integ-test zip from Maven Central (newest that resolves).
mkdir -p "$CACHE/es" && chmod 755 "$CACHE" "$CACHE/es"
if [ -z "$ES_VERSION" ]; then
  if [ -f "$CACHE/es/version" ]; then
    ES_VERSION=$(cat "$CACHE/es/version")
  else
    # 9.x is not published as an integ-test zip on Maven Central (checked 2026-11-27:
    # maven-metadata.xml lists 8.x only); try 9.x first in case it appears.
    for v in 9.3.0 8.19.21; do
      if [ -f "$CACHE/es/elasticsearch-$v.zip" ] || mvn -q -B -U \
          org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
          -Dartifact="org.elasticsearch.distribution.integ-test-zip:elasticsearch:$v:zip" \
          -DoutputDirectory="$CACHE/es" >/dev/null 2>&1; then
        ES_VERSION=$v; break
      fi
      log "Elasticsearch $v integ-test zip not on Maven Central, trying the next"
    done
    [ -n "$ES_VERSION" ] || { log "no Elasticsearch integ-test zip resolved"; exit 1; }
    echo "$ES_VERSION" > "$CACHE/es/version"
  fi
fi
if [ ! -d "$CACHE/es/elasticsearch-$ES_VERSION" ]; then
  if [ ! -f "$CACHE/es/elasticsearch-$ES_VERSION.zip" ]; then
    mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
      -Dartifact="org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ES_VERSION:zip" \
      -DoutputDirectory="$CACHE/es" >/dev/null
  fi
  log "unpacking Elasticsearch $ES_VERSION"
  (cd "$CACHE/es" && unzip -q -o "elasticsearch-$ES_VERSION.zip")
fi
ln -sfn "$CACHE/es/elasticsearch-$ES_VERSION" "$CACHE/es/current"

# Elasticsearch refuses root: a dedicated system user runs it.
if [ "$(id -u)" = 0 ] && ! id "$ES_USER" >/dev/null 2>&1; then
  log "creating system user $ES_USER"
  useradd --system --no-create-home --shell /usr/sbin/nologin "$ES_USER"
fi
log "ready: venv $VENV, Elasticsearch $ES_VERSION at $CACHE/es/current"
