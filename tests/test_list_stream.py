"""``kvpki list --json`` streams: rows read incrementally, JSON written in chunks, same array as before."""

from __future__ import annotations

import json
import os
import subprocess
import types
from datetime import timedelta
from pathlib import Path

import pytest

from kvpki_cli.errors import EXIT_BACKEND
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import Inventory
from kvpki_cli.listing import CHUNK
from tests.conftest import KVPKI, Kvpki
from tests.test_inventory_backends import NOW, inventory, inventory_url, make_record  # noqa: F401

ROWS = 2500  # ~1 MB of JSON: several chunks, and more than a pipe holds


@pytest.mark.parametrize("status", [None, "valid", "revoked", "expired"])
def test_iter_certificates_is_lazy_and_equals_the_list(inventory: Inventory, status: str | None) -> None:  # noqa: F811
    records = [make_record(not_after=NOW + timedelta(days=(-1) ** i * 30)) for i in range(2100)]
    inventory.record_issued(records)
    for record in records[::3]:
        inventory.revoke("root", record.serial, NOW - timedelta(hours=1), "keyCompromise")
    rows = inventory.iter_certificates("root", status, NOW, with_der=False)
    assert isinstance(rows, types.GeneratorType)  # nothing read before the first row is asked for
    assert list(rows) == inventory.list_certificates("root", status, NOW, with_der=False)


@pytest.fixture
def listed(local_kvpki: Kvpki, tmp_path: Path) -> Kvpki:
    """A CA with ``ROWS`` certificates in a SQLite inventory, a third of them revoked."""
    url = f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    local_kvpki.env = dict(local_kvpki.env, KVPKI_INVENTORY_URL=url)
    local_kvpki.init_ca("devices", "--subject", "CN=Devices,O=kvpki")
    opened = open_inventory(url, tmp_path)
    records = [make_record("devices", sans=("DNS:dev.example", f"URI:urn:x:{i}")) for i in range(ROWS)]
    opened.record_issued(records)
    for record in records[::3]:
        opened.revoke("devices", record.serial, NOW - timedelta(hours=1), "superseded")
    opened.close()
    return local_kvpki


def expected(kv: Kvpki, status: str | None) -> list[dict[str, object]]:
    from kvpki_cli.authority import utcnow

    url = kv.env["KVPKI_INVENTORY_URL"]
    opened = open_inventory(url, kv.home)
    now = utcnow()
    try:
        return [r.as_json(now) for r in opened.list_certificates("devices", status, now, with_der=False)]
    finally:
        opened.close()


@pytest.mark.parametrize("status", [None, "revoked", "expired"])
def test_list_json_is_the_same_array_written_in_chunks(listed: Kvpki, status: str | None) -> None:
    args = ["list", "--ca", "devices", "--json", *(["--status", status] if status else [])]
    out = listed.ok(*args)
    rows = json.loads(out)
    assert rows == expected(listed, status)
    assert len(rows) == {None: ROWS, "revoked": (ROWS + 2) // 3, "expired": 0}[status]
    if rows:  # one record per line between the brackets
        assert out.startswith(b"[\n{") and out.endswith(b"}\n]\n") and out.count(b"\n") == len(rows) + 2
        assert len(out) > CHUNK
    else:
        assert out == b"[]\n"


def test_list_json_to_a_reader_that_leaves_is_one_error_line(listed: Kvpki) -> None:
    """The reader closes after the first bytes: later chunks hit EPIPE mid-array; one line, no traceback."""
    process = subprocess.Popen([*KVPKI, "list", "--ca", "devices", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=listed.env, cwd=listed.home)  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(100).startswith(b"[\n{")
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(60) == EXIT_BACKEND, stderr
    lines = stderr.splitlines()
    assert lines == ["kvpki: error: stdout was closed"], stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_list_json_to_a_full_disk_is_one_error_line(listed: Kvpki) -> None:
    with open("/dev/full", "wb") as full:
        result = subprocess.run([*KVPKI, "list", "--ca", "devices", "--json"], stdout=full, stderr=subprocess.PIPE,
                                env=listed.env, cwd=listed.home, timeout=60)  # fmt: skip
    assert result.returncode == EXIT_BACKEND
    assert result.stderr.decode().splitlines() == ["kvpki: error: cannot write to stdout: No space left on device"]


def test_a_database_failing_mid_listing_leaves_stdout_empty(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """The script contract: nothing on stdout on failure, even after many records were already encoded."""
    from kvpki_cli.errors import BackendError
    from kvpki_cli.listing import write_json_array

    def rows() -> object:
        for index in range(20_000):  # ~ 2 MB of JSON: several chunks before the failure
            yield {"serial": f"{index:040x}", "subject": "CN=" + "x" * 60}
        raise BackendError("inventory went away")

    with pytest.raises(BackendError):
        write_json_array(rows())  # type: ignore[arg-type]
    assert capsysbinary.readouterr().out == b""
    write_json_array(iter([{"a": 1}, {"b": 2}]))
    assert json.loads(capsysbinary.readouterr().out) == [{"a": 1}, {"b": 2}]
