"""Decoding with whatever adapter the caller activated: left-padded batches, stop strings.

``from crma_lightning.generation import generate_text`` keeps working (the names of :mod:`.decode`);
``ContinualLM.generate``/``route`` are in :mod:`crma_lightning.model.task_generation`.
"""

from crma_lightning.generation.decode import StopOnStrings, generate_from_ids, generate_text

__all__ = ["StopOnStrings", "generate_from_ids", "generate_text"]
