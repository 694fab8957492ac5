"""benchmarks/overhead.py ends with a line scripts can read: ``CRMA / LoRA <ratio> hidden=<width>``."""

from __future__ import annotations

import re

from benchmarks import overhead

TINY = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "4", "--vocab", "128",
        "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--no-peft"]  # fmt: skip


def test_the_last_line_is_the_paired_crma_over_lora_ratio(capsys):
    result = overhead.main(TINY)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"CRMA / LoRA (\d+\.\d{4}) hidden=32", last)
    assert match, last
    assert float(match.group(1)) == round(result["median_paired_ratio"]["crma_over_lora"], 4)
