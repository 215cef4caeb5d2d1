"""A Spark session with Delta wired in, the same way under ``spark-submit`` and locally.

Under ``spark-submit`` the cluster's session already exists and this only adds what is missing;
locally it starts ``local[*]`` with the Delta jars fetched by ``infra/bootstrap.sh`` (found through
``SLUICE_SPARK_JARS`` or the cache directory), so ``sluice backfill`` needs no Spark knowledge.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from transforms.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

JARS_ENV = "SLUICE_SPARK_JARS"

_DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
_LOCAL_CONF = {
    # A laptop or CI box: few cores, so few shuffle partitions; no UI port clashes between tests.
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.python.worker.reuse": "true",
    "spark.driver.memory": "2g",
    "spark.sql.session.timeZone": "UTC",
    "spark.databricks.delta.snapshotPartitions": "2",
}


def _repo_pom() -> Path | None:
    pom = Path(__file__).resolve().parents[2] / "infra" / "maven" / "pom.xml"
    return pom if pom.is_file() else None


def find_delta_jars() -> list[str]:
    """Jars for Delta: ``$SLUICE_SPARK_JARS`` (a directory or a comma list) or the bootstrap cache."""
    setting = os.environ.get(JARS_ENV)
    if setting:
        if os.path.isdir(setting):
            jars = sorted(glob.glob(os.path.join(setting, "*.jar")))
        else:
            jars = [j for j in setting.split(",") if j]
        if not jars:
            raise ConfigError(f"{JARS_ENV}={setting} holds no jars: run `make install` to fetch them")
        return jars
    pom = _repo_pom()
    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    if pom is not None:
        key = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
        jars = sorted(glob.glob(str(cache / f"jars-{key}" / "*.jar")))
        if jars:
            return jars
    raise ConfigError(f"Delta jars for Spark not found: run `make install` (or infra/bootstrap.sh), or set {JARS_ENV}")


def local_master(master: str | None, *, slots_per_core: int = 1) -> str:
    """``master`` if given; else ``local[*]``, or ``local[N]`` with N = this process's cores x ``slots_per_core``."""
    if master:
        return master
    if slots_per_core > 1:
        return f"local[{len(os.sched_getaffinity(0)) * slots_per_core}]"
    return "local[*]"


def get_session(
    *,
    app_name: str = "sluice",
    master: str | None = None,
    conf: dict[str, str] | None = None,
    local_slots_per_core: int = 1,
) -> SparkSession:
    """The active session if there is one (spark-submit), else a local one with Delta.

    Without a ``master``, a local session gets ``local[*]``, or ``local[cores x local_slots_per_core]``
    for jobs whose tasks wait on their Python workers as much as they compute (the scoring stream).
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        for k, v in (conf or {}).items():
            active.conf.set(k, v)
        return active
    builder = SparkSession.builder.appName(app_name)
    submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))  # set by spark-submit for the driver
    if master or not submitted:
        builder = builder.master(local_master(master, slots_per_core=local_slots_per_core))
        for k, v in _LOCAL_CONF.items():
            builder = builder.config(k, v)
        log4j = Path(__file__).with_name("log4j2.properties")
        builder = builder.config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
        builder = builder.config("spark.jars", ",".join(find_delta_jars()))
        # Local workers must run the driver's interpreter (the venv with torch), not `python3`.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    for k, v in {**_DELTA_CONF, **(conf or {})}.items():
        builder = builder.config(k, v)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session
