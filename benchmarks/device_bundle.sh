#!/usr/bin/env bash
# Spark for the GPU box: what `sluice backfill` needs there beyond its Python and torch.
#
# The device machine has Python 3.12 with torch, but no JVM, no pyspark and no network, and each
# call carries at most 64 MiB. So the backfill (bench row (b)) has never run under Spark on a GPU.
# This packs a jlink'ed Java 17 runtime, pyspark (Python and jars, less the jars a local backfill
# never loads: Hive, Kubernetes, Connect, MLlib, RocksDB ...), delta-spark's Python and jars, and
# deltalake into one tar.xz, split into chunks that each fit one call. A warm machine keeps what
# earlier calls wrote (it is given back 30 s after a call), so one call per chunk copies it to
# /tmp/sluice-bundle and the benchmark's call unpacks it (not yet tried on the device).
#
#   benchmarks/device_bundle.sh build [OUT=.bundle] [CHUNK_MIB=58]  # here; prints the calls to make
#   benchmarks/device_bundle.sh stash CHUNK_DIR                        # there, once per chunk
#   eval "$(benchmarks/device_bundle.sh unpack)"                       # there, after the last chunk
#
# `build` checks its own output: it unpacks the chunks into a scratch directory and starts a local
# Spark session with Delta on the bundle's JVM, jars and Python packages alone.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STASH=/tmp/sluice-bundle
SCRATCH=()
trap 'rm -rf "${SCRATCH[@]}"' EXIT

# Jars of pyspark's 277 that a local[N] Delta backfill never loads (`build` checks a session without
# them, and the device run is the backfill itself). rocksdbjni alone is 70 MB: Spark uses it only for
# streaming state stores and the history server's disk store.
EXCLUDED_JARS=(
  'rocksdbjni-*' 'spark-connect*' 'spark-mllib*' 'spark-graphx*' 'spark-repl*' 'spark-hive*'
  'spark-kubernetes*' 'spark-yarn*' 'spark-pipelines*' 'breeze*' 'spire*' 'cats-kernel*' 'algebra_*'
  'shapeless*' 'arpack*' 'blas-*' 'lapack-*' 'jpmml*' 'pmml-model*' 'scala-compiler*' 'jline-*'
  'hive-*' 'libthrift*' 'libfb303*' 'datanucleus-*' 'derby*' 'jdo-api*' 'javolution*' 'ST4*'
  'antlr-runtime-3*' 'bonecp*' 'HikariCP*' 'commons-dbcp*' 'transaction-api*' 'kubernetes-*'
  'okhttp*' 'okio*' 'logging-interceptor*' 'vertx-*' 'zookeeper*' 'curator-*' 'mesos*'
)

# Java modules: all java.* ones (Hadoop and Spark reach into most of them), and the jdk.* ones Spark's
# stack is known to need (Unsafe, Kerberos/Unix principals for Hadoop's UGI, JMX, EC crypto, zipfs).
java_modules() {
  local jmods="$1"
  {
    ls "$jmods" | sed -n 's/^\(java\.[a-z.]*\)\.jmod$/\1/p'
    printf '%s\n' jdk.unsupported jdk.security.auth jdk.management jdk.crypto.ec jdk.zipfs \
      jdk.naming.dns jdk.net jdk.charsets jdk.jfr jdk.management.agent \
      jdk.incubator.vector
  } | paste -sd, -
}

site_packages() {
  "${PYTHON:-python}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

build() {
  local out="${1:-$ROOT/.bundle}" chunk_mib="${2:-58}"
  local java_home site jars stage
  java_home="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"
  site="$(site_packages)"
  jars="${SLUICE_SPARK_JARS:?is unset: eval the output of infra/bootstrap.sh first}"
  stage="$(mktemp -d)"
  SCRATCH+=("$stage")

  echo "jlink: Java runtime from $java_home" >&2
  jlink --module-path "$java_home/jmods" --add-modules "$(java_modules "$java_home/jmods")" \
    --strip-debug --no-man-pages --no-header-files --compress=2 --output "$stage/jre"

  echo "python packages from $site" >&2
  mkdir -p "$stage/site" "$stage/delta-jars"
  local pkg
  for pkg in pyspark py4j delta deltalake arro3 deprecated importlib_metadata; do
    [ -e "$site/$pkg" ] || { echo "device_bundle: $site/$pkg is missing: make install first" >&2; return 1; }
    cp -a "$site/$pkg" "$stage/site/"
    cp -a "$site/$pkg"-*.dist-info "$stage/site/" 2>/dev/null || true
  done
  # Dist-info names differ from packages for some; copy the ones importlib.metadata is asked about.
  cp -a "$site"/pyspark-*.dist-info "$site"/delta_spark-*.dist-info "$site"/deltalake-*.dist-info "$stage/site/"
  find "$stage/site" -name __pycache__ -prune -exec rm -rf {} +
  local pattern removed=0
  for pattern in "${EXCLUDED_JARS[@]}"; do
    for jar in "$stage/site/pyspark/jars/"$pattern; do
      [ -e "$jar" ] && { rm "$jar"; removed=$((removed + 1)); }
    done
  done
  echo "pyspark jars: $removed left out, $(ls "$stage/site/pyspark/jars" | wc -l) kept" >&2
  repack_jars "$stage/site/pyspark/jars"
  if [ -d "$jars" ]; then
    cp -a "$jars"/*.jar "$stage/delta-jars/"
  else
    local jar
    for jar in ${jars//,/ }; do cp -a "$jar" "$stage/delta-jars/"; done
  fi

  echo "packing $(du -sh "$stage" | cut -f1) (xz, all cores)" >&2
  rm -rf "$out" && mkdir -p "$out"
  tar -C "$stage" -cf - . | xz -T0 -6 | split -b "${chunk_mib}M" -d -a 2 - "$out/part."
  local n=0 part
  for part in "$out"/part.*; do
    mkdir -p "$out/c$n" && mv "$part" "$out/c$n/"
    n=$((n + 1))
  done
  du -sh "$out"/c* >&2

  check "$out"
  echo "device calls, back to back (the machine is given back 30 s after a call ends):"
  local i
  for ((i = 0; i < n; i++)); do
    echo "  run(carry=[\"${out#$ROOT/}/c$i\"], command=\"benchmarks/device_bundle.sh stash ${out#$ROOT/}/c$i\")"
  done
  echo "  then in the benchmark's own call: eval \"\$(benchmarks/device_bundle.sh unpack)\"; ..."
}

repack_jars() {
  # Jars are deflated zips, which xz cannot shrink further: stored (uncompressed) jars let xz see the
  # class files and pack the bundle ~40% smaller. Native libraries for other systems than
  # linux-x86_64 (zstd, snappy, lz4, netty builds for macOS, Windows, ARM ...) are left out. Stored
  # entries are still valid jars, and signatures cover entries' contents, not their compression.
  "${PYTHON:-python}" - "$1" <<'EOF'
import re, sys, zipfile
from pathlib import Path

NATIVE = re.compile(r"\.(so|dll|dylib|jnilib|a)$", re.I)
FOREIGN = re.compile(r"darwin|mac|osx|windows|win32|win64|/win/|aix|freebsd|sunos|aarch|arm|ppc|s390|riscv|loong|mips|i386|x86/", re.I)
before = after = dropped = 0
for jar in sorted(Path(sys.argv[1]).glob("*.jar")):
    before += jar.stat().st_size
    tmp = jar.with_suffix(".tmp")
    try:
        with zipfile.ZipFile(jar) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                if NATIVE.search(info.filename) and FOREIGN.search(info.filename):
                    dropped += 1
                    continue
                data = src.read(info)  # before compress_type changes: it tells read() how to inflate
                info.compress_type = zipfile.ZIP_STORED
                dst.writestr(info, data)
    except zipfile.BadZipFile as exc:  # a jar Java reads but zipfile's CRC check refuses: keep it as it is
        print(f"jars: {jar.name} kept deflated ({exc})", file=sys.stderr)
        tmp.unlink()
    else:
        tmp.replace(jar)
    after += jar.stat().st_size
print(f"jars: {before / 2**20:.0f} MiB deflated -> {after / 2**20:.0f} MiB stored, {dropped} foreign native libs dropped", file=sys.stderr)
EOF
}

check() {
  # Unpack the chunks as the device will and start Spark + Delta on nothing else but the bundle.
  local out="$1" scratch
  scratch="$(mktemp -d)"
  SCRATCH+=("$scratch")
  cat "$out"/c*/part.* | xz -dc | tar -C "$scratch" -xf -
  echo "checking the bundle: a Delta write and read on local[2] with its JVM and jars alone" >&2
  local python
  python="$(command -v "${PYTHON:-python}")"
  env -i HOME="$HOME" PATH="$scratch/jre/bin:/usr/bin:/bin" JAVA_HOME="$scratch/jre" \
    SPARK_HOME="$scratch/site/pyspark" PYTHONPATH="$scratch/site:$ROOT" SLUICE_SPARK_JARS="$scratch/delta-jars" \
    "$python" - <<'EOF'
import os, sys, tempfile
import pyspark, deltalake
assert pyspark.__file__.startswith(os.environ["SPARK_HOME"]), f"pyspark came from {pyspark.__file__}"
from transforms.spark.session import get_session
spark = get_session(app_name="bundle-check", master="local[2]")
path = tempfile.mkdtemp() + "/t"
spark.range(1000).write.format("delta").save(path)
n = spark.read.format("delta").load(path).count()
assert n == 1000, n
assert deltalake.DeltaTable(path).version() == 0
java = spark.sparkContext._jvm.System.getProperty("java.home")
print(f"bundle ok: pyspark {pyspark.__version__} from {pyspark.__file__}, java.home {java}", file=sys.stderr)
spark.stop()
EOF
}

stash() {
  mkdir -p "$STASH"
  cp "$1"/part.* "$STASH/"
  ls -l "$STASH" >&2
}

unpack() {
  # Prints the exports; `eval` them. Safe to run twice.
  if [ ! -x "$STASH/root/jre/bin/java" ]; then
    # Python's tarfile, not xz(1): the device image is not promised to have xz.
    cat "$STASH"/part.* | python3 -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="tar")' "$STASH/root"
  fi
  local r="$STASH/root"
  echo "export JAVA_HOME=$r/jre SPARK_HOME=$r/site/pyspark SLUICE_SPARK_JARS=$r/delta-jars"
  echo "export PATH=$r/jre/bin:\$PATH PYTHONPATH=$r/site\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  check) shift; check "${1:-$ROOT/.bundle}" ;;
  stash) shift; stash "$1" ;;
  unpack) unpack ;;
  *) echo "usage: $0 build [OUT] [CHUNK_MIB] | check [OUT] | stash CHUNK_DIR | unpack" >&2; exit 2 ;;
esac
