"""The README's promises, run the way it shows them: `make run`, and the spark-submit line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from pipelines.demo_data import generate_items, write_items_table
from tests.e2e.conftest import REPO, run_cli
from transforms.spark.session import find_delta_jars

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "SLUICE_LOG_FORMAT": "json"}


def test_make_run_embeds_the_sample_then_only_new_changes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = subprocess.run(
        ["make", "-s", "run", f"DATA={data}", "ROWS=150"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"rows out\s+│\s+149", first.stdout), first.stdout
    assert "sluice lookup item" in first.stdout
    assert DeltaTable(str(data / "embeddings")).to_pyarrow_table().num_rows == 149

    second = subprocess.run(
        ["make", "-s", "run", f"DATA={data}", "ROWS=150"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to do" in second.stdout

    looked = run_cli("lookup", "item", "item-0000001", "item-missing", "--target", str(data / "embeddings"))
    assert looked.returncode == 0, looked.stderr
    lines = looked.stdout.strip().splitlines()
    assert '"found": true' in lines[0] and '"dim": 384' in lines[0]
    assert '"found": false' in lines[1]

    # A mistyped target: one line naming the table the store does serve; elsewhere, nothing published.
    typo = run_cli("lookup", "item", "item-0000001", "--target", str(data / "embedings"))
    assert typo.returncode != 0 and typo.stdout == ""
    assert f"already serves {data / 'embeddings'}, not {data / 'embedings'}" in typo.stderr
    elsewhere = tmp_path / "elsewhere" / "embeddings"
    nothing = run_cli("lookup", "item", "item-0000001", "--target", str(elsewhere))
    assert nothing.returncode != 0 and nothing.stdout == ""
    assert "run `sluice backfill` for it first" in nothing.stderr and len(nothing.stderr.strip().splitlines()) == 1
    assert not elsewhere.parent.exists()


def test_spark_submit_line_from_the_readme(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    line = re.search(r"^spark-submit .*?(?<!\\)$", readme, flags=re.M | re.S)
    assert line is not None
    command = line.group(0).replace("\\\n", " ")
    # Run it where only the script and the zip exist, so the package must come from --py-files.
    work = tmp_path / "work"
    (work / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "cli.py", work / "pipelines" / "cli.py")
    made = subprocess.run(["make", "-s", "dist"], cwd=REPO, capture_output=True, text=True, env=_env())
    assert made.returncode == 0, made.stderr
    (work / "dist").mkdir()
    shutil.copy(REPO / "dist" / "sluice.zip", work / "dist" / "sluice.zip")
    write_items_table(str(work / "data" / "items"), generate_items(60, seed=4))

    env = {
        **_env(),
        "SLUICE_SPARK_JARS": str(Path(find_delta_jars()[0]).parent),
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": "",
    }
    proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = DeltaTable(str(work / "data" / "embeddings")).to_pyarrow_table()
    assert out.num_rows == 60
    assert len(set(out.column("item_id").to_pylist())) == 60
