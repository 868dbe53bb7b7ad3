"""Errors in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

OpenAI clients read that body (the `openai` package raises e.g. BadRequestError with the message), so every error
the server answers with has it, whatever raised it: a request check, pydantic, routing, or a bug.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# The `type` OpenAI gives each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}

# What a client is told about a failure inside the server (the details go to the server's log).
INTERNAL_ERROR = "The server had an error while processing your request; its log has the details."


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
