"""One error type per envelope code, registered in one place.

Every error the system reports to a client or an operator is a subclass of
`TenantFleetError` with a unique ``code`` and an HTTP ``status``. The envelope is
``{"error": {"code", "message", "requestId", ...details}}``. Anything that is not a
`TenantFleetError` is rendered as ``INTERNAL`` (its traceback goes to the log only).
"""
from __future__ import annotations

from typing import Any, ClassVar


class TenantFleetError(Exception):
    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    # seconds a client should wait before retrying (the ``Retry-After`` header); None: don't say
    retry_after: ClassVar[int | None] = None
    registry: ClassVar[dict[str, type["TenantFleetError"]]] = {}

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return  # an abstract grouping class, not a code
        if cls.code in TenantFleetError.registry:
            raise TypeError(f"error code {cls.code} is already registered by {TenantFleetError.registry[cls.code].__name__}")
        TenantFleetError.registry[cls.code] = cls

    def envelope(self, request_id: str | None = None) -> dict[str, Any]:
        # details never override the envelope's own fields
        body: dict[str, Any] = {**self.details, "code": self.code, "message": self.message}
        if request_id is not None:
            body["requestId"] = request_id
        return {"error": body}


class Internal(TenantFleetError):
    code = "INTERNAL"
    status = 500


class ValidationFailed(TenantFleetError):
    code = "VALIDATION_FAILED"
    status = 400
    exit_code = 2


class BadRequest(TenantFleetError):
    """The request is not well-formed HTTP (refused by the HTTP parser before any route)."""
    code = "BAD_REQUEST"
    status = 400


class ConfigInvalid(TenantFleetError):
    code = "CONFIG_INVALID"
    status = 500
    exit_code = 2


class Unauthorized(TenantFleetError):
    code = "UNAUTHORIZED"
    status = 401


class Forbidden(TenantFleetError):
    code = "FORBIDDEN"
    status = 403


class NotFound(TenantFleetError):
    code = "NOT_FOUND"
    status = 404


class MethodNotAllowed(TenantFleetError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class RequestTimeout(TenantFleetError):
    """The request (its body) did not arrive within ``TENANTFLEET_HTTP_TIMEOUT_S``."""
    code = "REQUEST_TIMEOUT"
    status = 408


class PayloadTooLarge(TenantFleetError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class UnsupportedMediaType(TenantFleetError):
    """A request body in a media type the route doesn't read (JSON routes: not JSON)."""
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class TenantNotFound(TenantFleetError):
    code = "TENANT_NOT_FOUND"
    status = 404


class TenantExists(TenantFleetError):
    code = "TENANT_EXISTS"
    status = 409


class TenantSuspended(TenantFleetError):
    code = "TENANT_SUSPENDED"
    status = 403


class TenantMoving(TenantFleetError):
    code = "TENANT_MOVING"
    status = 503


class TenantNotReady(TenantFleetError):
    code = "TENANT_NOT_READY"
    status = 503


class ShardNotFound(TenantFleetError):
    code = "SHARD_NOT_FOUND"
    status = 404


class ShardExists(TenantFleetError):
    code = "SHARD_EXISTS"
    status = 409


class ShardUnreachable(TenantFleetError):
    """A shard (or the control plane) doesn't answer: a real fault, worth a retry later."""
    code = "SHARD_UNREACHABLE"
    status = 503
    retry_after = 5


class NoShardAvailable(TenantFleetError):
    code = "NO_SHARD_AVAILABLE"
    status = 503


class FenceStale(TenantFleetError):
    """The shard's fence epoch is newer than the resolved one: re-resolve and retry."""
    code = "FENCE_STALE"
    status = 503


class PluginNotFound(TenantFleetError):
    code = "PLUGIN_NOT_FOUND"
    status = 404


class PluginDisabled(TenantFleetError):
    code = "PLUGIN_DISABLED"
    status = 403


class PluginRefused(TenantFleetError):
    code = "PLUGIN_REFUSED"
    status = 409


class MigrationFailed(TenantFleetError):
    code = "MIGRATION_FAILED"
    status = 500


class MigrationDrift(TenantFleetError):
    code = "MIGRATION_DRIFT"
    status = 409
    exit_code = 3


class MigrationIncomplete(TenantFleetError):
    """Files a plugin version needs are not recorded for some shard or tenant."""
    code = "MIGRATION_INCOMPLETE"
    status = 409
    exit_code = 4


class SchemaTooNew(TenantFleetError):
    """A database's tenantfleet schema was made by a newer tenantfleet than this one: this
    one would set it up as it knows it (an older fence, say), so it refuses to touch it."""
    code = "SCHEMA_TOO_NEW"
    status = 409
    exit_code = 2


class RunNotFound(TenantFleetError):
    code = "RUN_NOT_FOUND"
    status = 404


class RunBusy(TenantFleetError):
    """A run can't take that action in its state: resume of a run that is done or running
    (here or in another process), stop of a run that isn't running here."""
    code = "RUN_BUSY"
    status = 409
    exit_code = 3


class FleetError(TenantFleetError):
    """The embedded fleet could not be started, stopped or reached."""
    code = "FLEET_ERROR"
    status = 500


class TenantBusy(TenantFleetError):
    """The tenant is held by another long operation: an open move, or a migration in flight."""
    code = "TENANT_BUSY"
    status = 409
    exit_code = 3


class MoveFailed(TenantFleetError):
    """A tenant move could not finish a step; the tenant is still served from one shard
    and the move can be resumed (``move --resume RUN``) or aborted (``move --abort RUN``)."""
    code = "MOVE_FAILED"
    status = 500
    exit_code = 5


class MoveRefused(TenantFleetError):
    """A move's pre-flight found the tenant or the target not ready (no key on a table,
    target behind on migrations, replication not available); nothing was changed."""
    code = "MOVE_REFUSED"
    status = 409
    exit_code = 2
