"""A message when a night is published: its summary POSTed to a webhook (a JSON body, or Slack's
incoming-webhook text). The URL is a secret read from an environment variable; it is never logged.
Sending is best effort: a few retries with a timeout, and a failure is logged, never raised, so a
dead endpoint cannot fail or hold up the publish. Redirects are refused (a webhook that redirects
elsewhere does not get the message)."""

from __future__ import annotations

import os
import time
import urllib.error

from ..config import NotifyConfig
from ..log import log
from ..web import post_json

__all__ = ["notify", "message"]


def message(summary: dict, fmt: str) -> dict:
    """The body sent for a published night: the summary itself (``json``), or Slack's ``{"text": ...}``
    with the headline and what needs attention."""
    if fmt == "json":
        return summary
    lines = [
        f"*CTD audit of {summary['audited_date']}* ({summary['run_id']}): "
        + ("needs attention" if summary["attention"] else "nothing needs attention")
    ]
    lines += [f"• {t}" for t in summary["attention"]] + [f"{t}" for t in summary["headline"][:2]]
    lines.append(f"Report: {summary['report']}")
    return {"text": "\n".join(lines)}


def notify(cfg: NotifyConfig | None, summary: dict) -> bool:
    """Send the night's message when configured (and when it needs attention, unless ``when:
    always``). Returns whether it was delivered; never raises."""
    if cfg is None or (cfg.when == "attention" and not summary.get("attention")):
        return False
    url = os.environ.get(cfg.url_env)
    if not url:
        log(f"notify: environment variable {cfg.url_env} (audit.notify.url_env) is not set: no message sent")
        return False
    body, delay = message(summary, cfg.format), 0.5
    for attempt in range(cfg.retries + 1):
        try:
            status, _ = post_json(url, body, cfg.timeout_seconds)
            log(f"notify: message delivered to ${cfg.url_env} (HTTP {status})")
            return True
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}"
            if e.code < 500 and e.code != 429:
                break  # the endpoint answered no: retrying will not change it
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = type(getattr(e, "reason", e)).__name__
        if attempt < cfg.retries:
            time.sleep(delay)
            delay *= 2
    log(
        f"notify: no message delivered to ${cfg.url_env} ({why} after {attempt + 1} attempt(s)); the run is published all the same"
    )
    return False
