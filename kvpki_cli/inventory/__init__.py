"""The inventory: every certificate a CA issued, and its revocation status.

``open_inventory`` is the one place that picks the database from configuration.
"""

from __future__ import annotations

from pathlib import Path

from kvpki_cli.errors import UsageError
from kvpki_cli.inventory.base import Inventory


def open_inventory(url: str | None, home: Path) -> Inventory:
    """SQLite under ``home`` by default; ``postgresql://...`` for a CA shared by several machines."""
    if not url or url.startswith("sqlite:"):
        from kvpki_cli.inventory.sqlite import SqliteInventory

        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite:")) if url else home / "inventory.sqlite3"
        return SqliteInventory(path)
    if url.startswith(("postgresql://", "postgres://")):
        from kvpki_cli.inventory.postgres import PostgresInventory  # type: ignore[import-not-found,unused-ignore]

        return PostgresInventory(url)  # type: ignore[no-any-return,unused-ignore]
    raise UsageError(f"unsupported inventory URL {url.split(':', 1)[0]!r}: use sqlite:///path or postgresql://...")
