"""Read-only queries for the HTTP API (issue #12): tickets by driver, CP and time, drivers."""

from __future__ import annotations

__all__ = ["QueryMixin"]


class QueryMixin:
    """Read-only methods of :class:`~persistence.repository.Repository` used by API_Central."""
