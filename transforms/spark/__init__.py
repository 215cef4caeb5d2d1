"""Thin Spark adapters over the engine-free core: sessions, ``mapInArrow`` wrappers, Delta I/O."""
