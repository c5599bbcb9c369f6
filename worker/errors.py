"""Every error vector-sidecar raises on purpose.

    SidecarError
    ├── ConfigError            settings that cannot work (stops start-up, names the setting)
    ├── SchemaOutdated         the database is behind the code's migrations (run `sidecar migrate`)
    ├── InvalidEvent           an event breaks the contract (names the field and the rule)
    ├── InvalidQuery           a search parameter breaks its rule (worker/search.py)
    ├── NoSuchCollection       a search names a collection with nothing indexed (worker/search.py)
    ├── RetryLater             transient: try the same work again after a backoff
    │   ├── ProviderThrottled  429 from the provider (RPM, TPM, burst)
    │   ├── ProviderUnavailable 5xx, timeouts, connection errors
    │   ├── MalformedResponse  wrong count, dimension, index, NaN, truncated JSON
    │   ├── StoreUnavailable   the vector store did not answer
    │   ├── StoreConflict      the vector store holds a newer state than SQL
    │   └── BudgetExceeded     a spend cap is reached (worker/ledger/budget.py)
    └── GiveUp                 permanent for this input: record why, do not retry as is
        ├── InputRejected      the provider refused some texts (moderation, length, empty)
        ├── AccountError       key, arrears, not purchased, quota: pauses embedding for everyone
        └── StoreRejected      the vector store refused one document's write or delete

The worker acts only on the split RetryLater versus GiveUp, and on four flags every error
carries (set by its class, or by the adapter that raises it): `pauses_everyone`, `narrow`,
`counts_attempt` and `maybe_charged`. Adapters translate library exceptions into these at the
boundary (`raise ... from exc`), so the worker never looks at a library's exception.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallInfo:
    """What is known of one failed provider call, for the ledger."""

    http_status: int | None = None
    error_code: str | None = None
    request_id: str | None = None
    latency_ms: float | None = None
    message: str | None = None


class SidecarError(Exception):
    """Root of vector-sidecar's own errors."""

    call: CallInfo | None = None
    # Stop every process's provider calls for a while (the account, not the input, is at fault).
    pauses_everyone: bool = False
    # A batch failed because of one of its rows: split it to find that row.
    narrow: bool = False
    # May be the document's own fault: counts toward its attempts (then it is dead-lettered).
    counts_attempt: bool = False
    # The provider may have billed the failed call (a read timeout, a cut or unusable answer).
    maybe_charged: bool = False


class ConfigError(SidecarError):
    """A setting cannot work; the message names it."""


class SchemaOutdated(SidecarError):
    """The database schema is not at the code's head revision."""


class InvalidEvent(SidecarError):
    """An event breaks the event contract (worker/events.py)."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class InvalidQuery(SidecarError):
    """A search parameter breaks its rule (names the parameter and the rule; worker/search.py)."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class NoSuchCollection(SidecarError):
    """A search names a collection with no indexed chunk (never written, or all deleted)."""


class RetryLater(SidecarError):
    """Transient failure: the same work may succeed later."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        call: CallInfo | None = None,
        maybe_charged: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.call = call
        if maybe_charged is not None:
            self.maybe_charged = maybe_charged


class ProviderThrottled(RetryLater):
    """The provider answered 429 for a rate limit."""


class ProviderUnavailable(RetryLater):
    """5xx, timeout or connection failure talking to the provider."""


class MalformedResponse(RetryLater):
    """The provider's 2xx answer cannot be trusted (count, dimension, index, NaN, JSON)."""

    counts_attempt = True
    maybe_charged = True  # the provider answered, and likely billed


class StoreUnavailable(RetryLater):
    """The vector store did not answer."""

    counts_attempt = True


class StoreConflict(RetryLater):
    """The vector store refused a write: it holds a newer version or a delete."""

    counts_attempt = True


class GiveUp(SidecarError):
    """Permanent for this input: record the reason, do not retry it unchanged."""

    def __init__(
        self, message: str, *, call: CallInfo | None = None, maybe_charged: bool | None = None
    ) -> None:
        super().__init__(message)
        self.call = call
        if maybe_charged is not None:
            self.maybe_charged = maybe_charged


class InputRejected(GiveUp):
    """The provider refused the input (moderation, too long, empty, too many rows)."""

    narrow = True


class AccountError(GiveUp):
    """The account cannot be used (key, arrears, not purchased, free quota used up)."""

    pauses_everyone = True


class StoreRejected(GiveUp):
    """The vector store refused one document's write or delete (an error it did not expect)."""
