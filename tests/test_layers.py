"""Layering: the pure X.509 layer (``pki/``) never imports the key stores above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PKI = REPO / "kvpki_cli" / "pki"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_pki_module_imports_keystores() -> None:
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("kvpki_cli.keystores"))
        for path in sorted(PKI.glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_importing_all_of_pki_loads_no_keystore() -> None:
    modules = [f"kvpki_cli.pki.{path.stem}" for path in sorted(PKI.glob("*.py")) if path.stem != "__init__"]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('kvpki_cli.keystores')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_import_paths_still_work() -> None:
    from kvpki_cli.keystores.base import CAPrivateKey, KeyType
    from kvpki_cli.pki import keys
    from kvpki_cli.pki.certificates import signing_hash
    from kvpki_cli.pki.lean import Encoding, load_pem_private_key

    assert KeyType is keys.KeyType and CAPrivateKey is keys.CAPrivateKey and signing_hash is keys.signing_hash
    assert Encoding is keys.Encoding and load_pem_private_key is keys.load_pem_private_key
