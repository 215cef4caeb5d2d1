# sluice — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

ROOT := $(CURDIR)
DATA ?= $(ROOT)/data
ROWS ?= 20000
BOOT = eval "$$($(ROOT)/infra/bootstrap.sh)"; export SLUICE_SPARK_JARS SLUICE_KAFKA_JARS HF_HUB_OFFLINE=1 PYTHONPATH=$(ROOT); PATH="$$SLUICE_VENV/bin:$$PATH"

.PHONY: install run test test-fast lint typecheck bench dist lock clean kafka

install:  ## virtualenv + Spark jars, cached under ~/.cache/sluice (keyed by requirements.lock / pom.xml)
	$(BOOT)
	echo "sluice installed: $$SLUICE_VENV"

run:  ## install, create the sample items table, run the backfill on local Spark, print how to look items up
	$(BOOT)
	if [ ! -d "$(DATA)/items/_delta_log" ]; then sluice demo-data items --table "$(DATA)/items" --rows $(ROWS); fi
	sluice backfill --source "$(DATA)/items" --target "$(DATA)/embeddings" --mode incremental

test:  ## the whole suite (unit, integration with real Spark/Delta/Feast/Redis, e2e), then lint; CI runs exactly this
	$(BOOT)
	$(ROOT)/infra/ensure-redis.sh
	python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lint

test-fast:  ## unit tests only
	$(BOOT)
	python -m pytest -q tests/unit $(PYTEST_ARGS)

lint:  ## ruff (lint and format) and mypy: part of `make test`, so CI fails on them too
	$(BOOT)
	ruff check schemas transforms pipelines tests benchmarks
	ruff format --check schemas transforms pipelines tests benchmarks
	mypy

kafka:  ## a local Kafka broker (KRaft, single node) in the foreground until Ctrl-C; data survives restarts
	$(BOOT)
	python -m pipelines.dev_kafka --port $(or $(PORT),9092) --data-dir "$(or $(KAFKA_DATA),$(DATA)/kafka)"

bench:  ## benchmarks/README.md explains the figures
	$(BOOT)
	python benchmarks/backfill_bench.py --out benchmarks/results $(BENCH_ARGS)

dist:  ## dist/sluice.zip for spark-submit --py-files
	rm -rf dist && mkdir -p dist
	python3 -c "import zipfile,pathlib; z=zipfile.ZipFile('dist/sluice.zip','w',zipfile.ZIP_DEFLATED); [z.write(p) for d in ('schemas','transforms','pipelines') for p in sorted(pathlib.Path(d).rglob('*.py'))]"
	echo "dist/sluice.zip"

lock:  ## re-resolve requirements.lock from pyproject.toml (all extras)
	d=$$(mktemp -d); python3.11 -m venv $$d; $$d/bin/pip install -q ".[spark,feast,kafka,dev]"; \
	  { sed -n '1,2p' requirements.lock; $$d/bin/pip freeze --exclude sluice; } > requirements.lock.new && mv requirements.lock.new requirements.lock; rm -rf $$d

clean:
	rm -rf data dist spark-warehouse metastore_db derby.log
