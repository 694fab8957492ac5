"""The routing settings of a run, as one value: checked once, written once, compared once.

``fit`` builds it from the ``routing:`` section (:class:`~crma_lightning.callbacks.RoutedEvaluation`'s
arguments), the run's ``config.yaml`` records :meth:`RoutingConfig.as_dict`, and ``evaluate`` and
``generate`` start from the run's value and override what their flags name (:meth:`RoutingConfig.override`):
a hybrid run's ``fallback_margin`` reaches them whichever way the run was started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from crma_lightning.routing import prototype
from crma_lightning.routing.policy import DEFAULT_PREFIX_TOKENS, ORACLE, PROTOTYPE, validate_routing


@dataclass(frozen=True)
class RoutingConfig:
    """How a task adapter is chosen without a label (docs/configuration.md, ``routing:``).

    Raises ``ValueError`` naming the bad field when built with invalid settings.
    """

    mode: str = ORACLE
    """``oracle``, ``perplexity``, ``prototype`` or ``none`` (:data:`~crma_lightning.routing.ROUTING_MODES`)."""
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS
    """``P``: the tokens read to choose (perplexity: scored under every candidate; prototype: pooled)."""
    layer: int | list[int] | str = prototype.DEFAULT_LAYER
    """``prototype``: which ``hidden_states`` are pooled (an index, a list, or ``auto``)."""
    pooling: str = prototype.DEFAULT_POOLING
    """``prototype``: how the prefix's hidden states become one feature vector."""
    estimator: str = "mahalanobis"
    """``prototype``: ``mahalanobis`` (shared covariance, LDA) or ``nearest`` (Euclidean to the mean)."""
    shrinkage: float = prototype.DEFAULT_SHRINKAGE
    """``prototype``: shrinkage of the shared covariance towards its diagonal."""
    fallback_margin: float | None = None
    """``prototype`` + ``mahalanobis``: the hybrid - near-ties within this log-odds margin go to perplexity."""

    def __post_init__(self) -> None:
        prototype.validate_prototype(self.layer, self.pooling, self.estimator, self.shrinkage)
        validate_routing(self.mode, self.prefix_tokens, self.fallback_margin, self.estimator)
        object.__setattr__(self, "layer", prototype.plain_layer(self.layer))

    @property
    def prototype_settings(self) -> dict[str, Any]:
        """``layer``, ``pooling``, ``estimator`` and ``shrinkage``: the prototype router's own settings."""
        return {"layer": self.layer, "pooling": self.pooling, "estimator": self.estimator, "shrinkage": self.shrinkage}

    @property
    def router_settings(self) -> dict[str, Any]:
        """The arguments of a :class:`~crma_lightning.routing.prototype.PrototypeRouter` with these settings."""
        return {"prefix_tokens": self.prefix_tokens, **self.prototype_settings}

    def as_dict(self) -> dict[str, Any]:
        """The ``routing:`` section of a ``config.yaml`` (prototype fields only where they apply)."""
        out: dict[str, Any] = {"mode": self.mode, "prefix_tokens": self.prefix_tokens}
        if self.mode == PROTOTYPE:
            out.update(self.prototype_settings)
        if self.fallback_margin is not None:
            out["fallback_margin"] = self.fallback_margin
        return out

    def override(
        self, mode: str, prefix_tokens: int | None = None, fallback_margin: float | None = None
    ) -> RoutingConfig:
        """The settings a command routes with: ``mode`` and the flags given, the rest from this run's settings.

        The prototype settings and the margin carry over only when both are ``prototype`` (they mean nothing
        to another mode); ``prefix_tokens`` carries over from any routed run (not from ``oracle``'s default).
        """
        same = self.mode == mode == PROTOTYPE
        prefix = prefix_tokens or (self.prefix_tokens if self.mode != ORACLE else DEFAULT_PREFIX_TOKENS)
        margin = fallback_margin if fallback_margin is not None else self.fallback_margin if same else None
        base = self if same else RoutingConfig()
        return dataclasses.replace(base, mode=mode, prefix_tokens=prefix, fallback_margin=margin)
