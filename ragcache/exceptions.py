"""The small family of errors ragcache raises at its callers.

Redis trouble is never raised: lookups degrade to misses and stores to ``False``.
What is raised is a mistake in the call itself, which the caller must fix, and, for a
stream that was sharing an identical live stream, the loss of that stream midway.
"""


class RagcacheError(Exception):
    """Base class for every error ragcache raises."""


class InvalidRequestError(RagcacheError, ValueError):
    """The messages, params, sources or response given to ragcache cannot be used as they are."""


class ScopeRequiredError(InvalidRequestError):
    """A policy scoped to users or tenants was called without ``scope=``."""

    def __init__(self, policy: str, scope_kind: str) -> None:
        super().__init__(
            f"ragcache policy {policy!r} caches per {scope_kind}: pass scope=<the {scope_kind} id> "
            f"so that one {scope_kind}'s answers are never served to another, or set the "
            f"policy's scope to 'global' in the admin if its answers are safe to share."
        )
        self.policy = policy
        self.scope_kind = scope_kind


class StreamInterrupted(RagcacheError):
    """A stream that was receiving an identical live stream's chunks (``get_or_stream``
    with concurrent identical requests) lost it after some chunks were delivered, when
    that stream's upstream failed or its own consumer left. Retrying makes a new call."""
