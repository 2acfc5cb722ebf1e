"""The server side: sessions with their own KV caches, running decoder layers `k..L-1`."""

from .engine import SplitServer
from .state import ServerLimits

__all__ = ["ServerLimits", "SplitServer"]
