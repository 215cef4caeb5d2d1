from __future__ import annotations

from transforms.spark.score import python_error_line

_REPORT = """org.apache.spark.api.python.PythonException: Traceback (most recent call last):
  File "/work/transforms/models/ctr_registry.py", line 88, in current
    raise ModelLoadError(message)
transforms.errors.ModelLoadError: CTR model /models/ctr: model.safetensors fails its checksum
\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunner.scala:600)
\tat java.base/java.lang.Thread.run(Thread.java:840)
"""


def test_the_workers_python_exception_is_picked_out_of_the_jvm_report() -> None:
    assert python_error_line(_REPORT) == (
        "transforms.errors.ModelLoadError: CTR model /models/ctr: model.safetensors fails its checksum"
    )


def test_the_last_python_exception_wins_in_a_chained_traceback() -> None:
    chained = (
        "Traceback (most recent call last):\nKeyError: 'spec'\n\nThe above exception was the direct cause"
        " of the following exception:\n\nTraceback (most recent call last):\nValueError: bad manifest\n"
    )
    assert python_error_line(chained) == "ValueError: bad manifest"


def test_without_a_python_exception_the_first_line_is_kept() -> None:
    assert python_error_line("\n  Job aborted due to stage failure\nmore\n") == "Job aborted due to stage failure"
