#!/usr/bin/env bash
# Makes sure a `redis-server` binary is on PATH, for the Redis profile of the Feast online store and
# for the tests, which start their own private server (tests/fixtures/redis_server.py). Idempotent:
# does nothing when the binary is already there.
#
# Installs Debian's redis-server with apt-get (as root, or through passwordless sudo as on hosted CI
# runners). The package normally starts a system-wide redis on 6379 at install time; nothing here
# wants one, and a stray server on the default port would quietly answer a misconfigured job, so the
# install is kept from starting it and any service it did start is stopped and disabled.
set -euo pipefail
say() { printf 'ensure-redis: %s\n' "$*" >&2; }
die() { printf 'ensure-redis: error: %s\n' "$*" >&2; exit 1; }

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  die "redis-server is not installed and installing it needs root: run this script as root (or install redis-server 7.x yourself)"
fi
command -v apt-get >/dev/null 2>&1 \
  || die "redis-server is not installed and apt-get is not available: install redis-server 7.x with this system's package manager"

# policy-rc.d answering 101 tells Debian maintainer scripts not to start services. Only ours is
# removed afterwards; an existing one (as in most containers) is left exactly as it was.
policy=/usr/sbin/policy-rc.d
added_policy=0
cleanup() {
  if [ "$added_policy" = 1 ]; then "${as_root[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from sluice infra/ensure-redis.sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null \
    || die "cannot write $policy to keep the install from starting a system redis"
  "${as_root[@]}" chmod 755 "$policy"
  added_policy=1
fi

say "installing redis-server with apt-get"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
  || die "apt-get update failed (see above): check network access to the Debian/Ubuntu mirrors"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 \
  || die "apt-get install redis-server failed (see above)"

# Belt and braces for systems where the policy file is not honoured.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  "${as_root[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
  "${as_root[@]}" service redis-server stop >/dev/null 2>&1 || true
fi

command -v redis-server >/dev/null 2>&1 || die "apt-get reported success but redis-server is not on PATH"
say "installed $(redis-server --version | head -1)"
