"""Backwards-compatible name for the lean key helpers, which live in ``kvpki_cli.pki.keys`` now."""

from __future__ import annotations

from kvpki_cli.pki.keys import Encoding, PublicFormat, load_pem_private_key

__all__ = ["Encoding", "PublicFormat", "load_pem_private_key"]
