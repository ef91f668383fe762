"""cryptography's key loading and encodings without importing its ``serialization`` package.

``cryptography.hazmat.primitives.serialization`` pulls in its SSH support
(dataclasses, inspect, ciphers, bcrypt): about 10 ms, a sixth of a `sign-csr`
process.  The public names are thin aliases of what is imported here; if a
cryptography release moves them, the public package is used instead (slower, same result).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from cryptography.hazmat.primitives._serialization import Encoding, PublicFormat
except ImportError:  # pragma: no cover - depends on the cryptography release
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["Encoding", "PublicFormat", "load_pem_private_key"]


def _pem_private_key_loader() -> Callable[..., Any]:
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        return rust_openssl.keys.load_pem_private_key
    except (ImportError, AttributeError):  # pragma: no cover - depends on the cryptography release
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        return load_pem_private_key


def load_pem_private_key(data: bytes, password: bytes | None) -> Any:
    """Same contract as ``serialization.load_pem_private_key`` (ValueError/TypeError on failure)."""
    return _pem_private_key_loader()(data, password)
