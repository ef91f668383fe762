"""Azure IoT Hub / DPS: proof-of-possession certificates and disabling a revoked device's enrollment.

The DPS step runs against tests/dpsserver (the DPS service API written from Azure's
published REST specification, with its own Entra ID token endpoint) through the real
azure-identity DefaultAzureCredential; the network guard keeps every subprocess on loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import KVPKI, Kvpki
from tests.dpsserver.fixtures import dps_env, dps_fixture, dps_server  # noqa: F401 - fixtures
from tests.dpsserver.server import DpsTestServer
from tests.helpers import ec_csr_pem, load_cert, openssl_verify, pkilint_findings, write


# --------------------------------------------------------------------------- dps-verification
@pytest.fixture
def two_tier(kvpki: Kvpki) -> tuple[bytes, bytes]:
    root = kvpki.init_ca("root", "--subject", "CN=DPS Root,O=kvpki tests")
    issuing = kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=DPS Issuing,O=kvpki tests")
    return root, issuing


def test_verification_certificate_proves_possession(kvpki: Kvpki, two_tier: tuple[bytes, bytes], tmp_path: Path):
    """On every key store: CN = code, chains to the CA with openssl, pkilint-clean, end-entity, recorded."""
    root, issuing = two_tier
    code = "3A8D9B0C1E2F40516273849506A7B8C9D0E1F2A3B4C5D6E7"
    pem = kvpki.ok("dps-verification", "--ca", "issuing", "--code", code)
    cert = load_cert(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == code
    assert len(cert.subject) == 1
    result = openssl_verify(tmp_path, root, pem, issuing)
    assert result.returncode == 0, result.stderr
    assert pkilint_findings(write(tmp_path / "verification.pem", pem)) == ""
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=1, minutes=1)
    rows = [r for r in kvpki.inventory("issuing") if r["profile"] == "dps-verification"]
    assert [(r["serial"], r["subject"]) for r in rows] == [(format(cert.serial_number, "x"), f"CN={code}")]
    # the throwaway key is nowhere: the CA directory holds no new key file
    assert not list((kvpki.home / "cas" / "issuing").rglob("*verification*"))


def test_verification_refused_for_revoked_ca(local_kvpki: Kvpki, tmp_path: Path) -> None:
    local_kvpki.init_ca("root", "--subject", "CN=Root")
    issuing = local_kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Issuing")
    local_kvpki.ok("revoke", "--ca", "root", "--cert", str(write(tmp_path / "issuing.pem", issuing)))
    result = local_kvpki.run("dps-verification", "--ca", "issuing", "--code", "ABCDEF")
    assert result.returncode == 4 and result.stdout == b""
    assert b"was revoked" in result.stderr and result.stderr.count(b"\n") == 1
    assert local_kvpki.inventory("issuing") == []


@pytest.mark.parametrize(
    "code",
    ["", " ABC", "ABC ", "A" * 65, "AB\nC", "AB\x1bC", "c\u00f6de", "A\u00a0B"],
)
def test_verification_code_is_validated(local_kvpki: Kvpki, code: str) -> None:
    local_kvpki.init_ca("root", "--subject", "CN=Root")
    result = local_kvpki.run("dps-verification", "--ca", "root", "--code=" + code)
    assert result.returncode == 2, result.stderr
    assert result.stdout == b"" and result.stderr.count(b"\n") == 1
    assert local_kvpki.inventory("root") == []


def test_verification_validity_is_short(local_kvpki: Kvpki) -> None:
    local_kvpki.init_ca("root", "--subject", "CN=Root")
    assert local_kvpki.run("dps-verification", "--ca", "root", "--code", "AB", "--validity", "31d").returncode == 2
    pem = local_kvpki.ok("dps-verification", "--ca", "root", "--code", "AB", "--validity", "2h")
    assert load_cert(pem).not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=2)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70))
def test_check_code_accepts_exactly_printable_ascii_up_to_64(code: str) -> None:
    """The class: anything accepted becomes the CN unchanged; anything else is a usage error."""
    from kvpki_cli.dps_verification import check_code
    from kvpki_cli.errors import UsageError

    expected = 1 <= len(code) <= 64 and all(" " <= c <= "~" for c in code) and code == code.strip(" ")
    try:
        check_code(code)
        accepted = True
    except UsageError:
        accepted = False
    assert accepted == expected
    if accepted:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)])
        assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == code


# --------------------------------------------------------------------------- revoke --dps
class Cli:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*KVPKI, *args], input=input, capture_output=True, env=self.env, timeout=120)

    def ok(self, *args: str, input: bytes | None = None) -> bytes:
        result = self.run(*args, input=input)
        assert result.returncode == 0, f"kvpki {' '.join(args)}: {result.stderr.decode()}"
        return result.stdout

    def issue(self, cn: str) -> tuple[str, bytes]:
        pem = self.ok("sign-csr", "--ca", "root", input=ec_csr_pem(cn))
        return format(load_cert(pem).serial_number, "x"), pem

    def status(self, serial: str) -> str:
        rows = json.loads(self.ok("list", "--ca", "root", "--json"))
        return next(r["status"] for r in rows if r["serial"] == serial)


@pytest.fixture
def cli(tmp_path: Path, dps: DpsTestServer) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    runner = Cli(home, dps_env(dps, home))
    runner.ok("init-ca", "--name", "root", "--subject", "CN=Fleet Root")
    return runner


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_revoke_dps_creates_disabled_enrollment(cli: Cli, dps: DpsTestServer) -> None:
    serial, pem = cli.issue("Device-007")
    result = cli.run("revoke", serial, "--ca", "root", "--dps", dps.url, "--reason", "keyCompromise")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "revoked"
    assert document["dps"]["registrationId"] == "device-007" and document["dps"]["outcome"] == "created"
    enrollment = dps.enrollment("device-007")
    assert enrollment is not None
    assert enrollment["registrationId"] == "device-007" and enrollment["provisioningStatus"] == "disabled"
    assert enrollment["attestation"]["type"] == "x509"
    assert dps.stored_certificate("device-007") == load_cert(pem)
    puts = [e for e in dps.log if e.method == "PUT"]
    assert len(puts) == 1 and puts[0].if_match is None  # created: no If-Match
    assert b"individual enrollment device-007 created" in result.stderr


def test_existing_enrollment_is_disabled_with_if_match_and_kept(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device-008")
    other = cli.ok("sign-csr", "--ca", "root", input=ec_csr_pem("device-008"))  # e.g. its renewed certificate
    primary = {"primary": {"certificate": other.decode()}}
    status, created, _ = dps.put_enrollment(
        "device-008",
        {
            "registrationId": "device-008",
            "attestation": {"type": "x509", "x509": {"clientCertificates": primary}},
            "iotHubs": ["hub-1.azure-devices.net"],
            "provisioningStatus": "enabled",
        },
        None,
    )
    assert status == 200
    dps.fail_next(412, method="PUT")  # someone changed it between our GET and PUT: read again, retry with the new ETag
    result = cli.run("revoke", serial, "--ca", "root", "--dps", dps.url)
    assert result.returncode == 0, result.stderr
    enrollment = dps.enrollment("device-008")
    assert enrollment is not None and enrollment["provisioningStatus"] == "disabled"
    assert enrollment["iotHubs"] == ["hub-1.azure-devices.net"]  # other settings kept
    puts = [e for e in dps.log if e.method == "PUT"]
    assert puts[-1].status == 200 and puts[-1].if_match == created["etag"]
    # running it again changes nothing
    again = cli.ok("dps-disable", serial, "--ca", "root", "--dps", dps.url)
    assert json.loads(again)["outcome"] == "already-disabled"
    assert len([e for e in dps.log if e.method == "PUT"]) == len(puts)


def test_dps_down_keeps_revocation_and_dps_disable_repeats_it(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device-009")
    down = f"https://127.0.0.1:{_closed_port()}"
    result = cli.run("revoke", serial, "--ca", "root", "--dps", down)
    assert result.returncode == 6
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    rerun = f"kvpki dps-disable {serial} --ca root --dps {down}"
    assert lines[0].startswith(f"kvpki: error: revoked {serial} locally; DPS step failed: ")
    assert lines[0].endswith(f"re-run with: {rerun}")
    assert cli.status(serial) == "revoked"  # the local revocation was committed first
    assert cli.run("revoke", serial, "--ca", "root").returncode == 7
    # the printed command, pointed at a DPS that is up, finishes the job
    args = rerun.split()[1:]
    args[-1] = dps.url
    document = json.loads(cli.ok(*args))
    assert document["outcome"] == "created" and document["registrationId"] == "device-009"
    assert dps.enrollment("device-009")["provisioningStatus"] == "disabled"  # type: ignore[index]


def test_dps_5xx_is_retried(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device-010")
    dps.fail_next(503, 2)
    assert cli.run("revoke", serial, "--ca", "root", "--dps", dps.url).returncode == 0
    assert dps.enrollment("device-010")["provisioningStatus"] == "disabled"  # type: ignore[index]


def test_dps_403_names_the_missing_role(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device-011")
    dps.deny()
    result = cli.run("revoke", serial, "--ca", "root", "--dps", dps.url)
    assert result.returncode == 6 and result.stdout == b""
    line = result.stderr.decode()
    assert line.count("\n") == 1
    assert "DPS step failed" in line and "denied access (403" in line
    assert "Device Provisioning Service Data Contributor" in line
    assert cli.status(serial) == "revoked"
    assert dps.enrollment("device-011") is None


def test_dps_401_refreshes_the_token_once_then_reports(cli: Cli, dps: DpsTestServer) -> None:
    first, _ = cli.issue("device-012")
    cli.ok("revoke", first, "--ca", "root", "--dps", dps.url)
    assert dps.token_requests == 1
    dps.revoke_tokens()  # the cached token is now refused: one fresh token, then success
    second, _ = cli.issue("device-013")
    cli.ok("revoke", second, "--ca", "root", "--dps", dps.url)
    assert dps.token_requests == 2
    third, _ = cli.issue("device-014")
    dps.fail_next(401, 5)  # refused whatever the token: a clear message, not a loop
    result = cli.run("revoke", third, "--ca", "root", "--dps", dps.url)
    assert result.returncode == 6
    assert "rejected the Azure token (401" in result.stderr.decode()
    assert dps.token_requests == 3


def test_bad_registration_id_or_url_changes_nothing(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device@15")  # a valid IoT Hub device ID, not a DPS registration ID
    result = cli.run("revoke", serial, "--ca", "root", "--dps", dps.url)
    assert result.returncode == 2 and b"registration ID" in result.stderr
    assert cli.status(serial) == "valid"  # checked before the revocation
    for url in ("http://127.0.0.1:1", "https://127.0.0.1/enrollments", "https://user:pw@dps.example"):
        assert cli.run("revoke", serial, "--ca", "root", "--dps", url).returncode == 2
    assert cli.run("revoke", serial, "--ca", "root", "--dps", dps.url, "--no-dps").returncode == 2
    assert cli.status(serial) == "valid"
    assert dps.log == []


def test_per_ca_dps_url_setting(cli: Cli, dps: DpsTestServer) -> None:
    (cli.home / "config.toml").write_text(f'[ca.root]\ndps_url = "{dps.url}"\n')
    serial, _ = cli.issue("device-016")
    cli.ok("revoke", serial, "--ca", "root")
    assert dps.enrollment("device-016")["provisioningStatus"] == "disabled"  # type: ignore[index]
    skipped, _ = cli.issue("device-017")
    cli.ok("revoke", skipped, "--ca", "root", "--no-dps")
    assert dps.enrollment("device-017") is None
    (cli.home / "config.toml").write_text('[ca.root]\ndps_url = "not a url"\n')
    result = cli.run("list", "--ca", "root")
    assert result.returncode == 2 and b"dps_url" in result.stderr


def test_network_guard_blocks_a_real_dps(cli: Cli) -> None:
    """A real DPS host name never resolves in tests: the step fails fast, locally."""
    serial, _ = cli.issue("device-018")
    result = cli.run("dps-disable", serial, "--ca", "root", "--dps", "https://contoso.azure-devices-provisioning.net")
    assert result.returncode == 6
    assert b"contoso.azure-devices-provisioning.net" in result.stderr


def test_revoke_without_dps_imports_no_azure_code(tmp_path: Path) -> None:
    """The DPS path is opt-in: a plain revoke loads neither azure-identity nor the HTTP client."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['kvpki'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('kvpki_cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    loaded = [m for m in sys.modules if m.startswith(('azure', 'kvpki_cli.keystores.azure', 'http.client'))]\n"
        "    print(exc.code, loaded, file=sys.stderr)\n"
    )
    home = tmp_path / "h"
    env = {"KVPKI_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-c", code]
    subprocess.run([*KVPKI, "init-ca", "--name", "root", "--subject", "CN=R"], env=env, check=True, capture_output=True)
    leaf = subprocess.run(
        [*KVPKI, "sign-csr", "--ca", "root"], env=env, input=ec_csr_pem("d1"), capture_output=True, check=True
    ).stdout
    serial = format(load_cert(leaf).serial_number, "x")
    result = subprocess.run([*run, "revoke", serial, "--ca", "root"], env=env, capture_output=True, text=True)
    assert result.stderr.strip().endswith("0 []"), result.stderr


def test_azure_sign_in_failure_keeps_revocation(cli: Cli, dps: DpsTestServer) -> None:
    serial, _ = cli.issue("device-019")
    cli.env["AZURE_CLIENT_SECRET"] = "wrong"
    result = cli.run("revoke", serial, "--ca", "root", "--dps", dps.url)
    assert result.returncode == 6 and result.stdout == b""
    line = result.stderr.decode()
    assert line.count("\n") == 1 and "DPS step failed: Azure authentication failed" in line
    assert "wrong" not in line  # never the secret
    assert cli.status(serial) == "revoked" and dps.log == []
