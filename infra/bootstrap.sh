#!/usr/bin/env bash
# Installs what sluice needs, from nothing, into a cache outside the clone so that a fresh clone
# (CI's included) reuses it:
#   $SLUICE_CACHE/venv-<hash of requirements.lock + python version>   the virtualenv
#   $SLUICE_CACHE/jars-<hash of infra/maven/pom.xml>                   Delta jars for Spark
# Each is built under a temporary name and renamed only when complete, so an interrupted
# install never leaves a half-made cache behind. Prints the two paths as shell assignments.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SLUICE_CACHE:-$HOME/.cache/sluice}
mkdir -p "$cache"
say() { printf 'sluice bootstrap: %s\n' "$*" >&2; }
die() { printf 'sluice bootstrap: error: %s\n' "$*" >&2; exit 1; }

# --- Java 17+ (Spark 4 needs it) ------------------------------------------------------------
command -v java >/dev/null || die "java not found: install a JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless)"
java_major=$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1)
[ "${java_major:-0}" -ge 17 ] || die "Java ${java_major:-?} found, Spark 4 needs Java 17 or newer (JAVA_HOME=${JAVA_HOME:-unset})"

# --- Python 3.11/3.12 -------------------------------------------------------------------------
py=${SLUICE_PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(0 if (3,11) <= sys.version_info[:2] <= (3,12) else 1)'; then py=$(command -v "$c"); break; fi
  done
fi
[ -n "$py" ] || die "no Python 3.11 or 3.12 found (set SLUICE_PYTHON=/path/to/python3.11)"
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
venv="$cache/venv-$(echo "$pyver" | cat - "$root/requirements.lock" | sha256sum | cut -c1-16)"
if [ ! -f "$venv/.complete" ]; then
  say "creating virtualenv $venv (first run only: torch and Spark are large, this takes a few minutes)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q --progress-bar off -r "$root/requirements.lock" >&2 \
    || { rm -rf "$venv"; die "pip install -r requirements.lock failed (see above)"; }
  touch "$venv/.complete"
fi
# The project itself, editable, so the `sluice` command runs this clone's code. Cheap when unchanged.
if [ "$(cat "$venv/.sluice-src" 2>/dev/null)" != "$root" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e "$root" \
    >"$cache/editable-install.log" 2>&1 || die "pip install -e $root failed: see $cache/editable-install.log"
  echo "$root" > "$venv/.sluice-src"
fi

# --- Delta jars for Spark, fetched by Maven from Central ----------------------------------------
jars="$cache/jars-$(hash_of "$root/infra/maven/pom.xml")"
if [ ! -f "$jars/.complete" ]; then
  command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install maven)"
  say "fetching Spark jars into $jars"
  rm -rf "$jars" "$jars.tmp"
  mvn -q -B -s "$root/infra/maven/settings.xml" -f "$root/infra/maven/pom.xml" \
      dependency:copy-dependencies -DincludeGroupIds=io.delta -DoutputDirectory="$jars.tmp" >&2 \
    || die "mvn could not fetch the jars in infra/maven/pom.xml (see above)"
  touch "$jars.tmp/.complete"
  mv "$jars.tmp" "$jars"
fi

echo "SLUICE_VENV=$venv"
echo "SLUICE_SPARK_JARS=$jars"
