"""Request errors and their OpenAI- and Anthropic-shaped bodies."""
from __future__ import annotations

import logging

from ..errors import ContextOverflowError, Dsv4Error, InvalidArgumentError, OutOfMemoryError, StateError

log = logging.getLogger("uvicorn.error")


class RequestError(Exception):
    """A bad request: HTTP 400 (or `status`) with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


SHUTDOWN = error_body("the server is shutting down", "server_error", code="server_shutdown")


def error_of(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an exception raised by validation or the engine."""
    if isinstance(exc, RequestError):
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, ContextOverflowError):
        return 400, error_body(str(exc), "invalid_request_error", None, "context_length_exceeded")
    if isinstance(exc, (InvalidArgumentError, StateError)):
        return 400, error_body(str(exc), "invalid_request_error")
    if isinstance(exc, OutOfMemoryError):
        return 503, error_body(f"out of memory: {exc}", "server_error", code="out_of_memory")
    if isinstance(exc, Dsv4Error):
        return 500, error_body(f"{type(exc).__name__}: {exc}", "server_error")
    return 500, error_body(f"internal error ({type(exc).__name__})", "server_error")
