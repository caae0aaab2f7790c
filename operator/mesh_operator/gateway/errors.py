"""Errors the gateway answers itself, in OpenAI's shape.

`{"error": {"message", "type", "code", "param"}}` with the HTTP status OpenAI's
clients map to their exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 413, 502/503 InternalServerError). Errors
that llama-server returns are passed through untouched: they already have this shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# Names beyond this many are summarised in a 404 message.
MAX_NAMES_IN_MESSAGE = 50


class GatewayError(Exception):
    """An error answered by the gateway, carrying everything its response needs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=self.headers,
        )


def _names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    more = len(names) - MAX_NAMES_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


def unknown_model(requested: str, available: Sequence[str]) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{requested}` does not exist. Available models: {_names(available)}.",
        type_=INVALID_REQUEST,
        code="model_not_found",
        param="model",
    )


def ambiguous_model(requested: str, qualified: Sequence[str]) -> GatewayError:
    return GatewayError(
        400,
        f"The model `{requested}` is served in several namespaces; "
        f"name one of: {_names(qualified)}.",
        type_=INVALID_REQUEST,
        code="model_ambiguous",
        param="model",
    )


def bad_request(message: str, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, type_=INVALID_REQUEST, code=code, param=param)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        type_=INVALID_REQUEST,
        code="request_too_large",
    )


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
        type_=INVALID_REQUEST,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def not_ready(model: str, waited: float, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"The model `{model}` is not ready (waited {waited:.0f}s); retry later.",
        type_=SERVER_ERROR,
        code="model_not_ready",
        headers={"Retry-After": str(retry_after)},
    )


def busy(model: str, waited: float, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"Every slot of `{model}` stayed busy for {waited:.0f}s; retry later.",
        type_=SERVER_ERROR,
        code="model_busy",
        headers={"Retry-After": str(retry_after)},
    )


def queue_full(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"Too many requests are waiting for `{model}`; retry later.",
        type_=SERVER_ERROR,
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def model_gone(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` was deleted while the request waited.",
        type_=INVALID_REQUEST,
        code="model_not_found",
        param="model",
    )


def upstream_failed(model: str, detail: str) -> GatewayError:
    return GatewayError(
        502,
        f"The host of `{model}` failed: {detail}.",
        type_=SERVER_ERROR,
        code="upstream_error",
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500, "The gateway failed to handle the request.", type_=SERVER_ERROR, code="internal_error"
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(
        404, f"No such endpoint: {path}.", type_=INVALID_REQUEST, code="unknown_url"
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed on {path}.",
        type_=INVALID_REQUEST,
        code="method_not_allowed",
    )
