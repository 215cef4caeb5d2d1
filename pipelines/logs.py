"""Logging for sluice's commands: readable on a terminal, one JSON object per line elsewhere.

Airflow, Spark drivers on Kubernetes and CI collect stderr as text; JSON lines there can be
searched by run_id or model_version without regexes. ``SLUICE_LOG_FORMAT=json|text`` overrides.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from datetime import UTC, datetime

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure(level: str | None = None) -> None:
    """Structured (JSON) or rich logs on stderr; ``SLUICE_LOG_LEVEL`` (default INFO) and
    ``SLUICE_LOG_FORMAT`` (``json``/``text``) override, e.g. DEBUG for the consumer's per-batch lines."""
    level = (level or os.environ.get("SLUICE_LOG_LEVEL") or "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise SystemExit(f"error: SLUICE_LOG_LEVEL={level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    fmt = os.environ.get("SLUICE_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("py4j", "feast", "great_expectations", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Libraries' deprecation notices about their own imports are not the user's business.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.captureWarnings(True)
