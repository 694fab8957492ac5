"""Per-row held-out numbers of each matrix row: what ``DomainEvaluation(row_losses=True)`` keeps.

A domain's held-out loss ``L[s][j]`` is a token-weighted mean over its held-out rows. Intervals over
held-out rows (a bootstrap, as ``benchmarks/lib/stats.py`` computes) and paired comparisons of two runs on
the same rows need the rows' own numbers: per row, the summed next-token loss and the scored-token
count (``sum(loss_sum) / sum(tokens)`` over all rows is ``L[s][j]``), and per scored row the task score;
and, per held-out row, the document it starts in (rows of one document are not independent samples).

Rows are numbered as the data module holds them (``datamodule.eval_sets[domain]``, row 0 first). Each
rank evaluates a contiguous shard (``EvalShardSampler``) in order, so a rank's k-th row of a domain is
row ``shard start + k``; the padding batches that even out ranks' batch counts come after the shard
and are left out. At the end of the pass every rank contributes a full-length vector (zeros outside
its shard) and the vectors are summed across ranks, so the recorded rows are those of one process.

A routed evaluation in the same run (``RoutedEvaluation``) keeps its own per-row numbers the same way
(the routed and the oracle loss on the targets after the routing prefix, their count, and whether the
row went to its own adapter); both go to ``heldout_rows.json`` in the run directory after every stage
(:func:`write_row_losses`; format in docs/metrics.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from crma_lightning.adapters.serialization import atomic_write
from crma_lightning.data.sampling import shard_bounds

ROW_LOSSES_FILE = "heldout_rows.json"
FORMAT = "crma_lightning heldout rows v1"


def _dtype(device: torch.device) -> torch.dtype:
    """float64 (exact token counts, like ``DomainEvaluation``'s sums); MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class RowLosses:
    """Per-row numbers of one validation pass, per domain (this rank's shard).

    By default each row's summed loss and scored-token count (``DomainEvaluation``); ``fields`` names other
    columns (the routed evaluation keeps five). The fields in ``counts`` come back as integers.
    """

    def __init__(self, fields: Sequence[str] = ("loss_sum", "tokens"), counts: Sequence[str] = ("tokens",)) -> None:
        self.fields, self.counts = tuple(fields), frozenset(counts)
        self._rows: dict[str, tuple[int, int, list[list[float]]]] = {}  # domain -> (n, start, a list per field)

    def reset(self) -> None:
        self._rows = {}

    def add(self, trainer: L.Trainer, domain: str, *columns: torch.Tensor) -> None:
        """Record one batch of ``domain``'s rows (the next rows of this rank's shard): one ``(B,)`` per field."""
        if len(columns) != len(self.fields):
            raise ValueError(f"RowLosses.add got {len(columns)} columns for the fields {list(self.fields)}")
        if domain not in self._rows:
            n = len(trainer.datamodule.eval_sets[domain])
            start, _ = shard_bounds(n, trainer.world_size, trainer.global_rank)
            self._rows[domain] = (n, start, [[] for _ in self.fields])
        n, start, values = self._rows[domain]
        _, stop = shard_bounds(n, trainer.world_size, trainer.global_rank)
        room = max(stop - start - len(values[0]), 0)  # padding batches (after the shard) add nothing
        for out, column in zip(values, columns, strict=True):
            out.extend(column.detach().cpu().double().tolist()[:room])  # float64 on the host: not on MPS

    def gather(self, trainer: L.Trainer, domains: list[str], device: torch.device) -> dict[str, dict[str, list]]:
        """``{domain: {field: [...]}}`` (by default ``loss_sum`` and ``tokens``) summed over every rank.

        ``domains`` must be in the same order on every rank: each domain is one collective.
        """
        out: dict[str, dict[str, list]] = {}
        for domain in domains:
            n = len(trainer.datamodule.eval_sets[domain])
            start = shard_bounds(n, trainer.world_size, trainer.global_rank)[0]
            local = torch.zeros(len(self.fields), n, dtype=_dtype(device), device=device)
            _, _, values = self._rows.get(domain, (n, start, [[] for _ in self.fields]))
            for i, column in enumerate(values):
                if column:
                    local[i, start : start + len(column)] = torch.tensor(column, dtype=local.dtype)
            full = trainer.strategy.reduce(local, reduce_op="sum").cpu()
            out[domain] = {
                name: [int(t) for t in full[i].tolist()] if name in self.counts else full[i].tolist()
                for i, name in enumerate(self.fields)
            }
        return out


def gather_row_scores(
    trainer: L.Trainer, n: int, indices: list[int], scores: list[float], device: torch.device
) -> list[float]:
    """Every rank's ``(indices, scores)`` of one domain's score rows as one list of ``n`` scores."""
    local = torch.zeros(n, dtype=_dtype(device), device=device)
    if indices:
        local[torch.tensor(indices, device=device)] = torch.tensor(scores, dtype=local.dtype, device=device)
    return trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()


def row_documents(input_ids: Iterable[Sequence[int]], eos_id: int | None) -> list[int]:
    """For each held-out row, the index of the document (text) it starts in.

    Packed rows cut one stream of texts, each followed by EOS, so a row starts in document ``k`` when
    ``k`` EOS tokens come before it; unpacked rows are one text each and end with EOS, which gives
    ``k = row``. Without an EOS token every row counts as its own document.
    """
    out, seen = [], 0
    for i, ids in enumerate(input_ids):
        out.append(i if eos_id is None else seen)
        if eos_id is not None:
            seen += sum(1 for t in ids if t == eos_id)
    return out


def write_row_losses(
    run_dir: str | Path,
    domains: list[str],
    rows: dict[int, dict[str, dict[str, list]]],
    scores: dict[int, dict[str, list[float]]],
    documents: dict[str, list[int]] | None = None,
    routed: dict[int, dict[str, dict[str, Any]]] | None = None,
    routing: dict[str, Any] | None = None,
) -> Path:
    """Write ``heldout_rows.json`` (atomically): per matrix row ``s`` and domain, the rows' numbers.

    ``documents``: per domain, the document each held-out row starts in (:func:`row_documents`).
    ``routed``: the routed evaluation's rows (``RoutedEvaluation.row_table``), with its ``routing`` settings.
    """
    payload = {
        "format": FORMAT,
        "domains": list(domains),
        "rows": {str(s): rows[s] for s in sorted(rows)},
        "scores": {str(s): scores[s] for s in sorted(scores)},
        "documents": documents or {},
    }
    if routed:
        payload["routing"] = dict(routing or {})
        payload["routed"] = {str(s): routed[s] for s in sorted(routed)}
    path = Path(run_dir) / ROW_LOSSES_FILE
    text = json.dumps(payload, allow_nan=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_row_losses(path: str | Path) -> dict[str, Any]:
    """The content of a ``heldout_rows.json`` (or of the one in run directory ``path``).

    Raises:
        ValueError: The file is not a held-out rows file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ROW_LOSSES_FILE
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a held-out rows file (format {data.get('format')!r}, expected {FORMAT!r})")
    return data
