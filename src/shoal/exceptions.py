"""Exceptions raised by shoal, named as in Ray Serve so `except` clauses port unchanged."""

from __future__ import annotations


class RayServeException(Exception):
    """Base class of every error shoal raises itself."""


ShoalException = RayServeException


class BackPressureError(RayServeException):
    """A caller's queue for a deployment is full (`max_queued_requests`)."""

    def __init__(self, *, num_queued_requests: int, max_queued_requests: int, message: str = ""):
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.message = message or (
            f"Request dropped due to backpressure (num_queued_requests={num_queued_requests}, "
            f"max_queued_requests={max_queued_requests})."
        )
        super().__init__(self.message)

    def __reduce__(self):
        return (_rebuild_backpressure, (self.num_queued_requests, self.max_queued_requests, self.message))


def _rebuild_backpressure(num_queued: int, max_queued: int, message: str) -> BackPressureError:
    return BackPressureError(num_queued_requests=num_queued, max_queued_requests=max_queued, message=message)


class RequestCancelledError(RayServeException):
    """The request was cancelled before it produced a result."""

    def __init__(self, request_id: str | None = None):
        self.request_id = request_id
        super().__init__(f"Request {request_id} was cancelled." if request_id else "Request was cancelled.")

    def __reduce__(self):
        return (RequestCancelledError, (self.request_id,))


class DeploymentUnavailableError(RayServeException):
    """The deployment does not exist (any more) or cannot take requests."""


class ReplicaDiedError(RayServeException):
    """The replica process serving a request died before the request finished."""


# Ray's name for the same failure, so ported `except ActorDiedError` clauses keep working.
ActorDiedError = ReplicaDiedError
# Ray raises this when a replica cannot be reached; in shoal that is a replica that died.
ReplicaUnavailableError = ReplicaDiedError


class ReplicaOutOfMemoryError(ReplicaDiedError):
    """The controller replaced the replica serving a request because of memory: it exceeded its
    `ray_actor_options["memory"]` limit, or it was the largest replica when the machine ran low on
    memory. The message says which, with the sizes. The replica is being replaced; retrying may
    succeed if the request itself does not need that much memory."""


class DeployFailedError(RayServeException):
    """`serve.run` could not bring an application to RUNNING; the message holds the reason."""


class RemoteError(RayServeException):
    """User code raised an exception that could not be sent back as itself (it did not pickle)."""
