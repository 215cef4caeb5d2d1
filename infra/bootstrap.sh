#!/usr/bin/env bash
# Installs what sluice needs, from nothing, into a cache outside the clone so that a fresh clone
# (CI's included) reuses it:
#   $SLUICE_CACHE/venv-<hash of requirements.lock + python version>   the virtualenv
#   $SLUICE_CACHE/jars-<hash of infra/maven/pom.xml>                   Delta + Kafka connector jars for Spark
#   $SLUICE_CACHE/kafka-<hash of infra/kafka/pom.xml>                  a Kafka broker (KRaft) for dev and tests
# Each is built under a temporary name and renamed only when complete, so an interrupted
# install never leaves a half-made cache behind. Prints the three paths as shell assignments.
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

# --- Jars fetched by Maven from Central -------------------------------------------------------
# fetch_jars DIR POM: copy POM's runtime dependencies into DIR (which jars is decided in the pom).
fetch_jars() {
  local dir=$1 pom=$2
  [ -f "$dir/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install maven)"
  say "fetching the jars of ${pom#"$root"/} into $dir"
  rm -rf "$dir" "$dir.tmp"
  # Maven's output is only worth showing when it failed (with -q it still prints colour codes).
  if ! mvn -q -B -s "$root/infra/maven/settings.xml" -f "$pom" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dir.tmp" >"$dir.mvn.log" 2>&1; then
    cat "$dir.mvn.log" >&2
    die "mvn could not fetch the jars in ${pom#"$root"/} (see above, or $dir.mvn.log)"
  fi
  rm -f "$dir.mvn.log"
  touch "$dir.tmp/.complete"
  mv "$dir.tmp" "$dir"
}

# Delta and the Kafka connector for Spark. A jar that pyspark already ships would shadow or clash
# with Spark's own copy, so a pom change that lets one in fails here rather than inside a job.
jars="$cache/jars-$(hash_of "$root/infra/maven/pom.xml")"
if [ ! -f "$jars/.complete" ]; then
  fetch_jars "$jars" "$root/infra/maven/pom.xml"
  pyspark_jars=$(echo "$venv"/lib/python*/site-packages/pyspark/jars)
  if [ -d "$pyspark_jars" ]; then
    artifacts() { ls "$1" | grep '\.jar$' | sed -E 's/-[0-9][0-9A-Za-z.]*(-[0-9][0-9A-Za-z.]*)*\.jar$//' | sort -u; }
    dup=$(comm -12 <(artifacts "$jars") <(artifacts "$pyspark_jars") | paste -sd' ')
    [ -z "$dup" ] || { rm -rf "$jars"; die "infra/maven/pom.xml copies jars pyspark already ships ($dup): exclude them there"; }
  fi
fi

# The Kafka broker that `sluice dev kafka`, `make kafka` and the tests' fixture start.
kafka="$cache/kafka-$(hash_of "$root/infra/kafka/pom.xml")"
fetch_jars "$kafka" "$root/infra/kafka/pom.xml"

echo "SLUICE_VENV=$venv"
echo "SLUICE_SPARK_JARS=$jars"
echo "SLUICE_KAFKA_JARS=$kafka"
