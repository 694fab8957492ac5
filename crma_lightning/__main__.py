"""``python -m crma_lightning fit --config ...`` (same as the ``crma-lightning`` command)."""

from crma_lightning.cli import main

main()
