"""Esper: morphogenetic training — a network grows while it trains."""

__version__ = "0.1.0"
