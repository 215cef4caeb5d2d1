"""A real Apache Kafka broker (KRaft, one node) for development and tests.

The ad-scoring job's guarantees (offsets committed only after the sinks, replay after a crash)
are about what a real broker does, so development and the tests run the Apache Kafka broker
itself, not a mock: the jars ``infra/bootstrap.sh`` fetched from Maven Central
(``infra/kafka/pom.xml``, cached at ``$SLUICE_KAFKA_JARS``), started with ``java -cp`` — there is
no Docker image or tarball download to depend on. One process is both broker and controller
(KRaft "combined" mode), which Kafka documents as meant for development.

Everything lives under ``data_dir``: ``server.properties`` and ``log4j2.properties`` (rewritten
on every start), ``kraft/`` (the topic data and the metadata log; formatted once, so topics,
records and consumer group offsets survive ``stop``/``kill`` + ``start``) and, unless ``log_dir``
says otherwise, the broker's ``server.log`` and the JVM's console output ``kafka.out``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

from transforms.errors import ConfigError, SluiceError, SourceError

JARS_ENV = "SLUICE_KAFKA_JARS"
HOST = "127.0.0.1"
NODE_ID = 1

# Tuned for start-up time on a laptop or a 2-core CI box running Spark next to it, where every
# test restart pays for it: a small heap, the serial collector (no GC threads competing for the
# cores) and the C1 compiler only (roughly halves start-up under load; a dev broker is I/O-bound).
# Measurements of the broker itself should pass ``jvm_opts`` without the last two.
JVM_OPTS = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)
_START_TIMEOUT_S = 60.0
_FORMAT_TIMEOUT_S = 60.0
_LOG_TAIL_LINES = 3
_LOG_LINE_CHARS = 400

_log = logging.getLogger(__name__)


def _repo_pom() -> Path | None:
    pom = Path(__file__).resolve().parents[1] / "infra" / "kafka" / "pom.xml"
    return pom if pom.is_file() else None


def find_kafka_jars(jars_dir: str | Path | None = None) -> Path:
    """The broker's jar directory: ``jars_dir``, ``$SLUICE_KAFKA_JARS`` or the bootstrap cache.

    The cache directory is keyed by the pom's hash, as ``infra/bootstrap.sh`` names it, so a
    checkout finds its jars without the environment ``make`` sets up.
    """
    candidates: list[Path] = []
    if jars_dir is not None:
        candidates.append(Path(jars_dir))
    elif os.environ.get(JARS_ENV):
        candidates.append(Path(os.environ[JARS_ENV]))
    else:
        pom = _repo_pom()
        if pom is not None:
            cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
            candidates.append(cache / f"kafka-{hashlib.sha256(pom.read_bytes()).hexdigest()[:16]}")
    for d in candidates:
        if glob.glob(str(d / "kafka_2.*.jar")):
            return d
    where = str(candidates[0]) if candidates else f"${JARS_ENV}"
    raise ConfigError(f"Kafka broker jars not found in {where}: run `make install` (or infra/bootstrap.sh)")


def kafka_version(jars_dir: Path) -> str:
    """The broker's version, read off its jar's name (``kafka_2.13-4.4.0.jar`` -> ``4.4.0``)."""
    for jar in sorted(glob.glob(str(jars_dir / "kafka_2.*-*.jar"))):
        m = re.fullmatch(r"kafka_2\.\d+-(.+)\.jar", Path(jar).name)
        if m:
            return m.group(1)
    return "unknown"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise ConfigError("java not found: install a JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless)")
    return found


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the broker's own listener uses it: connections left in TIME_WAIT by a broker
    # that was just stopped or killed must not count as "taken", a live listener must.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _locked_by_other_process(lock_file: Path) -> bool:
    """Whether a live broker holds ``lock_file`` (Kafka's ``.lock``, a POSIX lock like ``lockf``)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return False  # never started, or not ours to judge: Kafka reports it itself
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the lock, if it was taken
    return False


def _new_cluster_id() -> str:
    # What `kafka-storage random-uuid` prints (a base64url UUID), without paying for a JVM start.
    # Kafka rejects ids that begin with "-" (they read as command-line flags).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _write_properties(path: Path, props: dict[str, str], header: str) -> None:
    lines = [f"# {header}"] + [f"{k}={v.replace(chr(92), chr(92) * 2)}" for k, v in props.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_tail(path: Path, start: int, n: int) -> list[str]:
    """The last ``n`` non-blank lines of ``path`` written after byte ``start``."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-n:]


class KafkaBroker:
    """One Kafka broker process on ``127.0.0.1:port`` with its data under ``data_dir``.

    ``restart()``/``start()`` after ``stop()`` or ``kill()`` reuse the same port and data, which
    is what the crash-and-replay tests need: committed records and consumer offsets survive.
    """

    def __init__(
        self,
        port: int,
        data_dir: str | Path,
        *,
        jars_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        start_timeout_s: float = _START_TIMEOUT_S,
        jvm_opts: Sequence[str] = JVM_OPTS,
    ) -> None:
        if not 0 < port < 65536:
            raise ConfigError(f"Kafka port must be between 1 and 65535, got {port}")
        self.port = port
        self.data_dir = Path(data_dir).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else self.data_dir
        self._jars_arg = jars_dir
        self.jars_dir: Path | None = None  # resolved on start
        self._start_timeout_s = start_timeout_s
        self._jvm_opts = list(jvm_opts)
        self._proc: subprocess.Popen[bytes] | None = None
        self._controller_port: int | None = None
        self._log_marks: tuple[int, int] = (0, 0)

    # -- where things are ---------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for clients: ``"127.0.0.1:PORT"``."""
        return f"{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        """The broker's own log (Log4j)."""
        return self.log_dir / "server.log"

    @property
    def console_file(self) -> Path:
        """The JVM's stdout/stderr: where a broker that dies before logging says why."""
        return self.log_dir / "kafka.out"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def kraft_dir(self) -> Path:
        return self.data_dir / "kraft"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and return once it answers metadata requests; no-op if running."""
        if self.running:
            return
        java = _java()
        jars = self.jars_dir = find_kafka_jars(self._jars_arg)
        # Checked before anything is written there: a second broker on the same data gets far
        # enough before Kafka's own lock check to corrupt the first one's metadata.
        if _locked_by_other_process(self.kraft_dir / ".lock"):
            raise ConfigError(
                f"Kafka data directory {self.data_dir} is in use by another broker: stop it or choose another one"
            )
        if not _port_free(self.port):
            raise ConfigError(f"port {self.port} on {HOST} is taken: stop what listens there or choose another port")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the Kafka data directory {self.data_dir}: {exc}") from exc
        self._controller_port = self._pick_controller_port()
        self._write_config()
        classpath = str(jars / "*")
        log4j = f"-Dlog4j2.configurationFile=file:{self.data_dir / 'log4j2.properties'}"
        self._log_marks = (self._size(self.log_file), self._size(self.console_file))
        if not (self.kraft_dir / "meta.properties").is_file():
            self._format(java, classpath, log4j)
        cmd = [java, *self._jvm_opts, log4j, f"-Dkafka.logs.dir={self.log_dir}", "-cp", classpath]
        cmd += ["kafka.Kafka", str(self.properties_file)]
        with self.console_file.open("ab") as console:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C meant for `sluice dev kafka` reaches Python, which then
                # stops the broker gracefully, instead of killing the JVM mid-write.
                start_new_session=True,
            )
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: Kafka's controlled shutdown flushes and closes its logs cleanly.

        A broker that has not exited after ``timeout`` seconds is killed (its data is recovered
        on the next start, as after ``kill``).
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _log.warning("Kafka broker on port %d did not stop within %.0fs; killing it", self.port, timeout)
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as when the broker process crashes: the next start recovers its logs.

        What the broker wrote survives in the OS page cache (unlike a power cut), so records it
        acknowledged are all there after the restart.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=30)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop gracefully (if running) and start again on the same port with the same data."""
        self.stop(timeout)
        self.start()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def _pick_controller_port(self) -> int:
        """The controller port of the last run if still free, else a fresh one.

        The quorum is static (``controller.quorum.voters``), so the port may change between runs;
        keeping it just makes successive ``server.properties`` easier to compare.
        """
        try:
            m = re.search(r"^controller\.quorum\.voters=\d+@[^:]+:(\d+)$", self.properties_file.read_text(), re.M)
        except OSError:
            m = None
        if m and int(m.group(1)) != self.port and _port_free(int(m.group(1))):
            return int(m.group(1))
        while True:
            port = free_port()
            if port != self.port:
                return port

    def _write_config(self) -> None:
        cport = self._controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{cport}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.kraft_dir),
            # One node: every internal topic must make do with one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # Fewer internal partitions than production's 50: the first consumer group (and the
            # first transaction) creates them all, which on a dev box costs seconds.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.num.partitions": "4",
            # Topics exist because someone created them (ensure_topics): a typo in a topic name must
            # fail, not silently create an empty topic.
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            # Tests join and leave consumer groups constantly; the 3 s default delay would be paid each time.
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the controller holds the dead incarnation's registration until its
            # session expires (9 s by default) and refuses the restarted broker until then.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            # Small segments and a day's retention: a dev broker's disk use stays bounded.
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.retention.hours": "24",
            "log.retention.check.interval.ms": "60000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }
        _write_properties(
            self.properties_file, props, "Written by sluice (pipelines/dev_kafka.py) on every start; edits are lost."
        )
        log4j = {
            "status": "warn",
            # Kafka stops itself from its own shutdown hook; Log4j's would race it and complain.
            "shutdownHook": "disable",
            "appender.file.type": "File",
            "appender.file.name": "file",
            "appender.file.fileName": str(self.log_file),
            "appender.file.layout.type": "PatternLayout",
            "appender.file.layout.pattern": "[%d] %p %m (%c)%n",
            "rootLogger.level": "INFO",
            "rootLogger.appenderRef.file.ref": "file",
            # Per-request and per-state-change chatter would drown the lines that explain a failure.
            "logger.request.name": "kafka.request.logger",
            "logger.request.level": "WARN",
            "logger.state.name": "state.change.logger",
            "logger.state.level": "WARN",
        }
        _write_properties(self.data_dir / "log4j2.properties", log4j, "Written by sluice (pipelines/dev_kafka.py).")

    def _format(self, java: str, classpath: str, log4j: str) -> None:
        """``kafka-storage format``: once per data directory (it holds the cluster id)."""
        cmd = [java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", log4j, "-cp", classpath]
        cmd += ["kafka.tools.StorageTool", "format"]
        cmd += ["--config", str(self.properties_file), "--cluster-id", _new_cluster_id(), "--ignore-formatted"]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=_FORMAT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise SourceError(
                f"formatting Kafka storage in {self.kraft_dir} took over {_FORMAT_TIMEOUT_S:.0f}s"
            ) from exc
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip().splitlines()
            raise SourceError(
                f"formatting Kafka storage in {self.kraft_dir} failed (exit {done.returncode}): "
                + " | ".join(out[-_LOG_TAIL_LINES:])
            )

    def log_tail(self) -> str:
        """What explains the broker's state, from what it wrote in this run.

        Its last ERROR/FATAL log lines if any; else the JVM's console output, whose first lines
        name the cause when Java could not even start Kafka (a bad option, a missing class);
        else its last log lines.
        """
        log = _read_tail(self.log_file, self._log_marks[0], 200)
        console = _read_tail(self.console_file, self._log_marks[1], 200)
        errors = [ln for ln in log if re.search(r"\] (ERROR|FATAL) ", ln)]
        picked = errors[-_LOG_TAIL_LINES:] or console[:_LOG_TAIL_LINES] or log[-_LOG_TAIL_LINES:]
        if not picked:
            return f"(nothing logged; see {self.log_file})"
        return " | ".join(ln[:_LOG_LINE_CHARS] for ln in picked)

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise ConfigError(
                        f"port {self.port} or {self._controller_port} on {HOST} was taken while the "
                        f"Kafka broker started: {tail}"
                    )
                raise SourceError(f"Kafka broker exited with code {code} while starting (log {self.log_file}): {tail}")
            # TCP first: until the listener is up, a Kafka client would log a connection error per retry.
            if _accepts(self.port) and self._answers_metadata():
                return
            time.sleep(0.1)
        raise SourceError(
            f"Kafka broker on {self.bootstrap} did not answer within {self._start_timeout_s:.0f}s "
            f"(log {self.log_file}): {self.log_tail()}"
        )

    def _answers_metadata(self) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap}, logger=_log)
        try:
            # The broker lists itself only once registered and unfenced: ready for topics and groups.
            return bool(admin.list_topics(timeout=2).brokers)
        except Exception:  # KafkaException while it is still coming up
            return False


# Brokers started by this process, stopped when it exits, so that a failed test run or script
# does not leave a JVM holding the port (only SIGKILL of Python itself can still orphan one).
_LIVE: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for broker in list(_LIVE):
        broker.stop(timeout=10)


def run_foreground(port: int, data_dir: Path) -> int:
    """Run a broker until SIGTERM or SIGINT, then stop it gracefully; returns the exit code.

    For ``sluice dev kafka`` and ``make kafka``. A broker that dies on its own raises
    ``SourceError`` (with the last lines of its log) instead of returning.
    """
    broker = KafkaBroker(port, data_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started = time.monotonic()
        broker.start()
        assert broker.jars_dir is not None
        print(
            f"Kafka {kafka_version(broker.jars_dir)} (KRaft, single node) listening on {broker.bootstrap} "
            f"after {time.monotonic() - started:.1f}s; data in {broker.data_dir}, log {broker.log_file}. "
            "Ctrl-C stops it.",
            flush=True,
        )
        while not stop.wait(1.0):
            if not broker.running:
                raise SourceError(f"Kafka broker on {broker.bootstrap} exited on its own: {broker.log_tail()}")
        print("stopping Kafka ...", flush=True)
        broker.stop()
        return 0
    finally:
        with contextlib.suppress(Exception):
            broker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.dev_kafka", description="Run a local Kafka broker (KRaft, single node)."
    )
    parser.add_argument("--port", type=int, default=9092, help="PLAINTEXT port on 127.0.0.1 (default 9092)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/kafka"), help="where topics and logs live")
    args = parser.parse_args(argv)
    try:
        return run_foreground(args.port, args.data_dir)
    except SluiceError as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
