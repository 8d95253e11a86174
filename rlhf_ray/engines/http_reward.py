"""A remote reward endpoint over HTTP: POST prompts and responses, get one score per response.

Wire format (JSON both ways)::

    request  {"prompts": ["...", ...], "responses": ["...", ...],
              "columns": {"answer": ["109", ...], ...}}   the prompt rows' other columns, one value per response
    answer   {"scores": [0.5, ...]}            one number per response (NaN: the driver skips the batch)

Safe by default: every request has a timeout; timeouts, connection errors, 5xx and 429 answers
are retried with exponential backoff, rotating over the configured URLs; an answer larger than
``max_response_bytes`` is refused before it is read whole; redirects are not followed (they could
carry the token elsewhere). The bearer token is read from the environment variable the config
names, at call time in the process that calls, and appears in no message, log or file.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from rlhf_ray.data.formats import column_values


class RewardEndpointError(RuntimeError):
    """The endpoint could not give usable scores; the message names the URL(s) and the problem."""


class _Retryable(Exception):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class HttpRewardClient:
    """Plain values only (it travels to the reward actor); holds the token's variable name, never the token."""

    urls: tuple[str, ...]
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5
    max_response_bytes: int = 1 << 20
    token_env: str = ""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        # The other columns of each response's prompt row, one list per column (as reward functions get them).
        body = json.dumps({"prompts": prompts, "responses": responses, "columns": column_values(prompts)}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token_env:
            token = os.environ.get(self.token_env)
            if not token:
                raise RewardEndpointError(f"the reward endpoint token variable {self.token_env} is not set "
                                          f"in this process's environment")
            headers["Authorization"] = f"Bearer {token}"
        failures = []
        for attempt in range(self.retries + 1):
            url = self.urls[attempt % len(self.urls)]
            try:
                return self._post(url, body, headers, len(responses))
            except _Retryable as e:
                failures.append(f"{url}: {e}")
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** attempt)
        raise RewardEndpointError(f"reward endpoint failed {len(failures)} times (retries={self.retries}): "
                                  + "; ".join(failures))

    def _post(self, url: str, body: bytes, headers: dict, n: int) -> list[float]:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as answer:
                size = answer.headers.get("Content-Length")
                if size is not None and not size.strip().isdigit():
                    raise _Retryable(f"malformed Content-Length {size[:20]!r}")
                if size is not None and int(size) > self.max_response_bytes:
                    raise self._too_large(url, int(size))
                data = answer.read(self.max_response_bytes + 1)
                if size is not None and len(data) < int(size):
                    raise _Retryable(f"answer cut short ({len(data)} of {int(size)} bytes)")
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from None
            raise RewardEndpointError(f"reward endpoint {url} answered HTTP {e.code} ({e.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        except http.client.HTTPException as e:  # a garbage status line, an answer cut short
            raise _Retryable(f"malformed HTTP answer ({type(e).__name__})") from None
        if len(data) > self.max_response_bytes:
            raise self._too_large(url, len(data))
        return _parse_scores(url, data, n)

    def _too_large(self, url: str, size: int) -> RewardEndpointError:
        return RewardEndpointError(f"reward endpoint {url} sent an answer of {size} bytes or more, over "
                                   f"scorers.http.max_response_bytes={self.max_response_bytes}")


def _parse_scores(url: str, data: bytes, n: int) -> list[float]:
    try:
        scores = json.loads(data)["scores"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise RewardEndpointError(f"reward endpoint {url} did not answer JSON with a 'scores' list") from None
    if not isinstance(scores, list) or len(scores) != n:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise RewardEndpointError(f"reward endpoint {url} returned {got} scores for {n} responses")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise RewardEndpointError(f"reward endpoint {url} returned a score that is not a number")
    return [float(s) for s in scores]


def client_for(section) -> HttpRewardClient | None:
    """The client of a ``scorers.http`` config section; None when it names no URL."""
    if not section.urls:
        return None
    return HttpRewardClient(tuple(section.urls), section.timeout_s, section.retries, section.backoff_s,
                            section.max_response_bytes, section.token_env)
