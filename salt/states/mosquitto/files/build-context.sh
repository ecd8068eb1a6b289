#!/bin/bash
# Managed by Salt (Tributary). Build a registry-free Docker build context for Mosquitto:
# FROM scratch + the host's mosquitto binary and the libraries it loads (ldd does not list
# libgcc_s.so.1, which glibc loads for thread cancellation: without it the bridge thread
# crashes), plus passwd/group entries so the broker can drop to the mosquitto user.
# Stateful for Salt: the last line says whether the context changed.
#   usage: build-context.sh [--check] <mosquitto binary> <context dir> <user> <group>
#   --check (Salt's test=True): only say whether the context would change.
set -euo pipefail
trap 'echo "build-context: line $LINENO: exit $?" >&2' ERR
check=false
if [ "${1:-}" = --check ]; then check=true; shift; fi
bin=$1; ctx=$2; user=$3; group=$4
new=$(mktemp -d "${ctx%/}.new.XXXXXX")
trap 'rm -rf "$new"' EXIT
root=$new/rootfs
mkdir -p "$root/etc" "$root/tmp" "$root$(dirname "$bin")"
cp -L "$bin" "$root$bin"
libs=$(ldd "$bin" | awk '/=>/ { print $3 } /^\t\/[^ ]+ \(/ { print $1 }')
# (awk reads to the end: an early exit would SIGPIPE ldconfig and fail the pipeline)
gcc=$(ldconfig -p | awk '/libgcc_s.so.1 / && /x86-64|64bit|AArch64/ && !f { print $NF; f = 1 }')
[ -n "$gcc" ] || gcc=$(ldconfig -p | awk '/libgcc_s.so.1 / && !f { print $NF; f = 1 }')
for lib in $libs $gcc; do
  [ -e "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
uid=$(id -u "$user"); gid=$(getent group "$group" | cut -d: -f3)
printf 'root:x:0:0:root:/:/nonexistent\n%s:x:%s:%s::/nonexistent:/nonexistent\n' \
  "$user" "$uid" "$gid" > "$root/etc/passwd"
printf 'root:x:0:\n%s:x:%s:\n' "$group" "$gid" > "$root/etc/group"
printf 'passwd: files\ngroup: files\n' > "$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
cat > "$new/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["$bin"]
DOCKERFILE
if [ -d "$ctx" ] && diff -r -q "$ctx" "$new" >/dev/null 2>&1; then
  echo "changed=no comment='image context up to date'"
  exit 0
fi
if $check; then
  echo "changed=yes comment='image context $ctx would be rewritten'"
  exit 0
fi
rm -rf "$ctx"
mv "$new" "$ctx"
trap - EXIT
echo "changed=yes comment='image context written to $ctx'"
