"""Engine-free building blocks of sluice, on pyarrow RecordBatches.

Everything a job does lives here once (model loading, batching, inference, validation, sinks);
the Spark and Beam adapters in ``transforms.spark`` / ``transforms.beam`` only move batches in
and out of their engine.
"""
