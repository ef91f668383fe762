"""How many OCSP nonce echoes per CA may cost a CA-key signature: a token bucket per CA.

Without a delegated responder every echoed nonce is a fresh CA-key signature; on
Key Vault anyone could spend the vault's signing budget (and make issuance wait)
by sending nonces.  Beyond this budget the nonce is ignored and the cached,
nonce-less response served instead (RFC 5019 2.1; RFC 8954 lets responders
ignore nonces).  Runs on the event loop only, so no lock.
"""

from __future__ import annotations

import logging
import time

from kvpki_cli.serve.ratelimit import Rate

LOG_INTERVAL_S = 60.0
log = logging.getLogger("kvpki.serve")


class NonceBudget:
    """Per CA: ``burst`` signatures at once, refilled at ``rate``; refusals logged at most once a minute."""

    def __init__(self, rate: Rate, burst: int) -> None:
        self.per_second = rate.count / rate.window
        self.burst = float(burst)
        self._tokens: dict[str, tuple[float, float]] = {}  # CA -> (tokens, at)
        self._refused: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def take(self, ca: str) -> bool:
        """Whether ``ca`` may sign one more nonce echo with its own key now."""
        now = time.monotonic()
        tokens, at = self._tokens.get(ca, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_second)
        if tokens >= 1.0:
            self._tokens[ca] = (tokens - 1.0, now)
            return True
        self._tokens[ca] = (tokens, now)
        self._refused[ca] = self._refused.get(ca, 0) + 1
        if now - self._logged.get(ca, -LOG_INTERVAL_S) >= LOG_INTERVAL_S:
            log.warning(
                "OCSP for CA %s: nonce requests beyond %.3g/s (burst %d) signed by the CA key: answering %d"
                " with the cached response without a nonce (create a responder: kvpki init-ocsp-responder)",
                ca, self.per_second, int(self.burst), self._refused.pop(ca),
            )  # fmt: skip
            self._logged[ca] = now
        return False
