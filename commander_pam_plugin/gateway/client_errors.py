"""What the router answers, and logs, when a client sends something it cannot use.

Every refusal is a JSON error with one line of reason that quotes nothing the client sent,
including requests aiohttp cannot even parse (its own reply is text/plain and repeats the
offending header, a bearer token included). A client's mistake is logged as one WARNING line,
never a traceback, and at most MISTAKES_PER_WINDOW lines per window, so a stranger cannot make
the log grow faster than that; the router's own failures stay ERRORs with their traceback.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..protocol import ProtocolError

log = logging.getLogger("commander_pam_plugin.gateway.router")  # these lines are the router's

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 429: "rate_limited", 431: "header_too_large", 500: "internal",
          502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}
# aiohttp's limit on one request line or header (its default; anything longer is refused with 431).
MAX_HEADER_BYTES = 8190
# Client mistakes are logged as one WARNING line each, at most this many per window; the rest are counted.
MISTAKES_PER_WINDOW = 10
MISTAKE_WINDOW_S = 10.0


class HttpError(ProtocolError):
    """A ProtocolError that also sets response headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, code or _CODES.get(status, "error"))
        self.headers = headers or {}


def error_response(exc: ProtocolError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status, headers=getattr(exc, "headers", None))


class MistakeLog:
    """One WARNING line per client mistake, never a traceback, and at most `burst` lines per
    `window` seconds: a stranger sending garbage cannot make the log grow faster than that."""

    def __init__(self, logger: logging.Logger, burst: int = MISTAKES_PER_WINDOW,
                 window: float = MISTAKE_WINDOW_S) -> None:
        self.logger, self.burst, self.window = logger, burst, window
        self.started = time.monotonic()
        self.logged = 0
        self.suppressed = 0

    def warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self.started >= self.window:
            self.started, self.logged = now, 0
        if self.logged >= self.burst:
            self.suppressed += 1
            return
        self.logged += 1
        if self.suppressed:
            text += f" ({self.suppressed} more client mistakes not logged)"
            self.suppressed = 0
        self.logger.warning("%s", text)


mistakes = MistakeLog(log)


def client_caused(exc: BaseException | None) -> HttpProcessingError | RequestPayloadError | None:
    """The HTTP parsing error behind `exc` (a malformed request or body), if there is one."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _parse_error_reply(exc: BaseException | None) -> HttpError:
    """What a request aiohttp could not parse gets: a fixed one-line reason, never its input."""
    if isinstance(exc, LineTooLong):
        return HttpError(431, f"a request line or header is longer than the limit of {MAX_HEADER_BYTES} bytes")
    if isinstance(exc, BadHttpMethod):
        return HttpError(400, "this is not an HTTP request")
    return HttpError(400, f"malformed HTTP request ({exc.__class__.__name__ if exc else 'unreadable'})")


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets a JSON 4xx that quotes
    nothing it was sent (aiohttp's own text/plain reply repeats the offending header, token
    included), logged as one rate-limited WARNING line instead of an ERROR traceback."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 and client_caused(exc) is None:
            self.log_exception("router: unexpected error handling a request", exc_info=exc)
            error = HttpError(500, "internal error in the router; see its log")
        else:
            error = _parse_error_reply(client_caused(exc))
            mistakes.warn(f"router: refused a malformed request from {request.remote}: {error.message}")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send an error reply")
        response = error_response(error)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A client's bad body surfacing in aiohttp's own code (e.g. while draining it) is a
        client mistake too: one WARNING line, no traceback. Anything else stays an ERROR."""
        found = client_caused(kw.get("exc_info") if isinstance(kw.get("exc_info"), BaseException) else None)
        if found is not None:  # the reply already said so (and the mistake was logged once, if at all)
            log.debug("router: a client sent an unreadable request (%s)", found.__class__.__name__)
            return
        super().log_exception(*args, **kw)


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose connections are handled by JsonErrorRequestHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                                handler_cancellation=server.handler_cancellation, loop=server._loop,
                                **server._kwargs)
