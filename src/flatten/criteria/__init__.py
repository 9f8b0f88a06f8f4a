"""Importance metrics (channel scorers) and pair-selection policies, each in a registry keyed by name."""

from flatten.registry import Registry

SCORERS: Registry = Registry("scorer")
POLICIES: Registry = Registry("pair-selection policy")

__all__ = ["POLICIES", "SCORERS"]
