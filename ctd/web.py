"""HTTP requests that carry credentials (the judge's API key, a webhook URL that is itself a secret):
redirects are never followed, so nothing is sent anywhere but the configured URL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

__all__ = ["post_json", "REDIRECT_REFUSED"]

REDIRECT_REFUSED = "redirect refused"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 (urllib's signature)
        raise urllib.error.HTTPError(req.full_url, code, f"{REDIRECT_REFUSED} ({code})", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_json(url: str, body: dict, timeout: float, headers: dict | None = None) -> tuple[int, bytes]:
    """POST ``body`` as JSON to ``url`` only: (HTTP status, response body). A redirect raises
    ``urllib.error.HTTPError`` with its 3xx code, as any error status does."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    with _OPENER.open(req, timeout=timeout) as r:
        return r.status, r.read()
