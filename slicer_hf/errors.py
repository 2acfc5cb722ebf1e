"""Exception hierarchy: every user mistake or bad input raises one of these, never a bare assert."""

from __future__ import annotations


class SlicerError(Exception):
    """Base class for all slicer_hf errors."""


class ConfigError(SlicerError, ValueError):
    """An invalid `SlicerConfig` field or an unusable combination of settings."""


class MissingDataError(SlicerError, FileNotFoundError):
    """A model, text or other file the call needs is neither on disk nor where it would be fetched from."""


class CodecError(SlicerError, ValueError):
    """A tensor the codec cannot encode, or a byte string it cannot decode."""


class TransportError(SlicerError, ConnectionError):
    """The link to the server failed: unreachable, vanished peer, timeout.

    `retryable` is False for failures another attempt cannot fix (a refused auth token, say); `unreachable` is True
    where nothing answered at all (no connection, or no answer on a new stream), as opposed to a server that answered
    with a refusal; `timed_out` where no reply came within the timeout (stalled, frozen, or only busy).
    """

    def __init__(
        self, message: str, retryable: bool = True, unreachable: bool = False, timed_out: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.unreachable = unreachable
        self.timed_out = timed_out


class NowhereElse(TransportError):
    """A transport of several servers has none left to try: each it knows ran and refused this session lately
    (full, its KV budget), so that refusal is the answer; no retry is due."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class StaleCacheError(SlicerError):
    """A KV cache given to a split model's forward holds positions its server no longer holds as they were (another
    generation ran since, its session closed, ...): start again from the whole prompt."""


class ProtocolError(SlicerError):
    """A message that breaks the protocol: wrong version, model mismatch, unknown session, limits."""

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code
