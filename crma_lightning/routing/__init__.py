"""Routing: choosing a task adapter without a task label.

The evaluation policy and ``route_batch`` (:mod:`.policy`), one prompt at a time (:mod:`.prompts`), and
the prototype router with its statistics (:mod:`.prototype`). Pure torch; an evaluation policy, not a
continual-learning method.

``from crma_lightning.routing import route_batch`` keeps working (the names of :mod:`.policy`).
"""

from crma_lightning.routing.policy import (
    DEFAULT_PREFIX_TOKENS,
    NONE,
    ORACLE,
    PERPLEXITY,
    PROTOTYPE,
    ROUTING_MODES,
    RoutedBatch,
    route_batch,
    routing_accuracy,
    scored_labels,
    validate_routing,
)

__all__ = [
    "DEFAULT_PREFIX_TOKENS",
    "NONE",
    "ORACLE",
    "PERPLEXITY",
    "PROTOTYPE",
    "ROUTING_MODES",
    "RoutedBatch",
    "route_batch",
    "routing_accuracy",
    "scored_labels",
    "validate_routing",
]
