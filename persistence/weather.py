"""Weather alerts and watched locations (EV_W, issue #12): the tables of migration 6."""

from __future__ import annotations

__all__ = ["WeatherMixin"]


class WeatherMixin:
    """Methods of :class:`~persistence.repository.Repository` for weather state."""
