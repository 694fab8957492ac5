"""Evaluation outputs: task scores, the run report and the loss-matrix image.

Task scores of held-out prompts (:mod:`.scoring`), the run report (``report.json``/``report.md``,
:mod:`.report`) and the loss-matrix image (:mod:`.plotting`). No Lightning: the callbacks
(``crma_lightning.callbacks``) drive them.
"""
