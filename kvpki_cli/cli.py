"""Thin click commands: parse arguments, call the issuance core, write stdout, map errors to exit codes.

stdout carries only the requested PEM/DER/JSON; every message goes to stderr as
one line.  Heavy modules (rich, the Azure SDK, the EST server) are imported
only by the commands that use them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvpki_cli.errors import EXIT_USAGE, KvpkiError, UsageError
from kvpki_cli.messages import info, warn
from kvpki_cli.pki.crl import REASONS
from kvpki_cli.pki.keys import KeyType

if TYPE_CHECKING:
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings

KEY_TYPES = tuple(key_type.value for key_type in KeyType)
REVOCATION_REASONS = tuple(REASONS)


class Context:
    """Per-invocation state shared by the commands (loaded lazily)."""

    def __init__(self, home: str | None) -> None:
        self.home = Path(home).expanduser() if home else None
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from kvpki_cli.config import Settings

            self._settings = Settings.load(self.home)
        return self._settings

    def authority(self, name: str) -> CertificateAuthority:
        from kvpki_cli.authority import CertificateAuthority

        return CertificateAuthority.open(self.settings, name)


def _write_stdout(
    data: bytes, issued: tuple[str, str] | None = None, committed: tuple[str, str] | None = None
) -> None:
    """Write the result; ``issued`` = (serial, CA) of a certificate just committed, ``committed`` = (what
    else was done, how to see it again): named in the error line if stdout fails, so nothing looks undone."""
    from kvpki_cli.signing import write_stdout

    write_stdout(data, issued, committed)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home", envvar="KVPKI_HOME", help="kvpki data directory (default: $KVPKI_HOME or ~/.local/share/kvpki)."
)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="kvpki", message="kvpki %(version)s")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """kvpki: a lightweight PKI for IoT with CA keys in Azure Key Vault or a local store."""
    ctx.obj = Context(home)


@cli.command("init-ca")
@click.option("--name", required=True, help="Name of the new CA.")
@click.option("--subject", required=True, help='Subject DN, e.g. "CN=Contoso Root CA,O=Contoso".')
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ec-p256", show_default=True)
@click.option("--validity", help="Lifetime, e.g. 10y (root default) or 5y (sub-CA default).")
@click.option("--parent", help="Create a subordinate CA signed by this CA.")
@click.option("--path-length", type=int, help="basicConstraints pathLenConstraint.")
@click.option("--store", type=click.Choice(("local", "azure")), help="Key store for the CA key (default: local).")
@click.option("--vault-url", help="Azure Key Vault URL (azure store).")
@click.option("--key-name", help="Key/certificate name in the vault (azure store; default: the CA name).")
@click.option("--hsm", is_flag=True, default=None, help="Use HSM-backed keys (Premium vaults).")
@click.pass_obj
def init_ca_command(
    obj: Context,
    name: str,
    subject: str,
    key_type: str,
    validity: str | None,
    parent: str | None,
    path_length: int | None,
    store: str | None,
    vault_url: str | None,
    key_name: str | None,
    hsm: bool | None,
) -> None:
    """Create a self-signed root CA, or a subordinate CA under --parent; print its certificate."""
    from kvpki_cli.authority import init_ca
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.pki.encoding import encode_certificates
    from kvpki_cli.pki.keys import KeyType
    from kvpki_cli.pki.names import parse_subject

    chain = init_ca(
        obj.settings,
        name,
        parse_subject(subject),
        KeyType(key_type),
        validity=parse_duration(validity, what="--validity") if validity else None,
        parent=parent,
        path_length=path_length,
        store=store,
        store_settings={"vault_url": vault_url, "key_name": key_name, "hsm": hsm},
    )
    _write_stdout(encode_certificates(chain[:1], "pem"), committed=(f"creating CA {name}", f"kvpki get-ca --ca {name}"))


@cli.command("sign-csr")
@click.argument("csr_files", nargs=-1)
@click.option("--ca", "ca_name", required=True, help="Name of the issuing CA.")
@click.option(
    "--profile", default="device", show_default=True, help="device, server, edge-ca, sub-ca or a configured profile."
)
@click.option("--validity", help="Requested lifetime, e.g. 90d (capped by the profile and the CA).")
@click.option("--subject", help="Override the CSR subject (RFC 4514 DN).")
@click.option("--san", "sans", multiple=True, help="Override the CSR SANs: DNS:name, IP:addr, URI:uri, email:addr.")
@click.option("--path-length", type=int, help="pathLenConstraint for CA profiles.")
@click.option("--chain", "with_chain", is_flag=True, help="Append the CA chain to the output.")
@click.option("--format", "fmt", type=click.Choice(("pem", "der", "pkcs7", "json")), default="pem", show_default=True)
@click.option("--requester", help="Identity recorded in the inventory (default: $KVPKI_REQUESTER or cli:<user>).")
@click.option(
    "--out-dir", type=click.Path(file_okay=False), help="Write one file per CSR here (required for several CSRs)."
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 256),
    help="Signatures in flight at once (default: 1 for a local key, from the vault's sign_rate for Key Vault).",
)
@click.pass_obj
def sign_csr_command(
    obj: Context,
    csr_files: Sequence[str],
    ca_name: str,
    profile: str,
    validity: str | None,
    subject: str | None,
    sans: Sequence[str],
    path_length: int | None,
    with_chain: bool,
    fmt: str,
    requester: str | None,
    out_dir: str | None,
    jobs: int | None,
) -> None:
    """Sign CSRs (PEM, DER or base64; '-' or nothing for stdin) and print the certificate."""
    from kvpki_cli.signing import SignOptions, sign_csrs

    sign_csrs(
        SignOptions(
            ca_name=ca_name,
            csr_files=csr_files,
            profile=profile,
            validity=validity,
            subject=subject,
            sans=sans,
            path_length=path_length,
            with_chain=with_chain,
            fmt=fmt,
            requester=requester,
            out_dir=out_dir,
            home=str(obj.home) if obj.home else None,
            jobs=jobs,
        )
    )


@cli.command("get-ca")
@click.option("--ca", "ca_name", required=True, help="Name of the CA.")
@click.option(
    "--chain",
    "with_chain",
    is_flag=True,
    help="The chain up to the root, CA certificate first; after a rollover also the earlier generations'"
    " CA certificates and cross-certificates still valid.",
)
@click.option("--generation", type=click.IntRange(0), help="This key generation only (see `kvpki rollover`).")
@click.option("--format", "fmt", type=click.Choice(("pem", "der", "pkcs7")), default="pem", show_default=True)
@click.pass_obj
def get_ca_command(obj: Context, ca_name: str, with_chain: bool, generation: int | None, fmt: str) -> None:
    """Print the CA certificate (or its chain)."""
    from kvpki_cli.pki.encoding import encode_certificates

    authority = obj.authority(ca_name)
    if generation is not None:
        chain = authority.generation(generation).chain
    elif with_chain:
        from kvpki_cli.rollover import published_certificates

        chain = published_certificates(authority)
    else:
        chain = authority.chain
    if fmt == "der" and with_chain and len(chain) > 1:
        raise UsageError("--chain needs --format pem or pkcs7 (DER holds one certificate)")
    _write_stdout(encode_certificates(chain if with_chain else chain[:1], fmt))


@cli.command("get-cert")
@click.argument("serial")
@click.option("--ca", "ca_name", required=True, help="Name of the issuing CA.")
@click.option("--chain", "with_chain", is_flag=True, help="Append the CA chain (CA certificate first).")
@click.option("--format", "fmt", type=click.Choice(("pem", "der", "pkcs7", "json")), default="pem", show_default=True)
@click.pass_obj
def get_cert_command(obj: Context, serial: str, ca_name: str, with_chain: bool, fmt: str) -> None:
    """Print a certificate the CA issued, from the inventory (e.g. one whose output was lost)."""
    from kvpki_cli.signing import stored_certificate

    _write_stdout(stored_certificate(obj.authority(ca_name), serial, fmt, with_chain))


@cli.command("revoke")
@click.argument("serial", required=False)
@click.option("--cert", "cert_file", help="Revoke the certificate in this PEM/DER file instead of a serial.")
@click.option("--ca", "ca_name", required=True, help="Name of the issuing CA.")
@click.option(
    "--reason", type=click.Choice(REVOCATION_REASONS, case_sensitive=False), default="unspecified", show_default=True
)
@click.option("--dps", "dps_url", help="Also disable the device in this Azure DPS (default: the CA's dps_url).")
@click.option("--no-dps", is_flag=True, help="Skip the DPS step even if the CA has a dps_url.")
@click.pass_obj
def revoke_command(
    obj: Context,
    serial: str | None,
    cert_file: str | None,
    ca_name: str,
    reason: str,
    dps_url: str | None,
    no_dps: bool,
) -> None:
    """Revoke a certificate by serial (hex) or by file; prints the updated record as JSON."""
    import json

    from kvpki_cli.pki.crl import parse_reason

    if (serial is None) == (cert_file is None):
        raise UsageError("give exactly one of SERIAL or --cert FILE")
    authority = obj.authority(ca_name)
    if cert_file is not None:
        from kvpki_cli.signing import read_input

        serial = authority.serial_of(_load_certificate(read_input(cert_file)))
    assert serial is not None
    from kvpki_cli.dps_cli import plan_dps_step, run_dps_step

    dps_target = plan_dps_step(obj.settings, authority, serial, dps_url, no_dps)  # checked before revoking
    record = authority.revoke(serial, parse_reason(reason))
    from kvpki_cli.authority import utcnow

    dps_result = run_dps_step(obj.settings, dps_target)  # after the commit: a DPS failure loses nothing
    document = record.as_json(utcnow()) | ({"dps": dps_result} if dps_result else {})
    shown = (f"revoking serial {record.serial}", f"kvpki get-cert {record.serial} --ca {ca_name} --format json")
    _write_stdout((json.dumps(document, indent=2) + "\n").encode(), committed=shown)
    sys.stderr.write(
        f"kvpki: revoked {record.serial} ({record.reason}); a running 'kvpki serve' re-signs its CRL and"
        " answers OCSP by itself; 'kvpki crl' writes a new CRL file for any other place you publish it\n"
    )


@cli.command("renew")
@click.argument("cert_file")
@click.argument("csr_file", default="-")
@click.option("--ca", "ca_name", required=True, help="Name of the CA that issued CERT_FILE.")
@click.option("--validity", help="Lifetime of the new certificate (default: the profile's).")
@click.option("--revoke-old", is_flag=True, help="Revoke the old certificate (reason superseded) once renewed.")
@click.option(
    "--renew-after-expiry",
    "after_expiry",
    metavar="DURATION",
    help="Also renew CERT_FILE if it expired at most this long ago, e.g. 180d"
    " (default: the CA's renew_after_expiry, else off).",
)
@click.option("--chain", "with_chain", is_flag=True, help="Append the CA chain to the output.")
@click.option("--format", "fmt", type=click.Choice(("pem", "der", "pkcs7", "json")), default="pem", show_default=True)
@click.option("--requester", help="Identity recorded in the inventory (default: $KVPKI_REQUESTER or cli:<user>).")
@click.pass_obj
def renew_command(
    obj: Context,
    cert_file: str,
    csr_file: str,
    ca_name: str,
    validity: str | None,
    revoke_old: bool,
    after_expiry: str | None,
    with_chain: bool,
    fmt: str,
    requester: str | None,
) -> None:
    """Renew CERT_FILE for the key in CSR_FILE ('-' = stdin): same subject, SANs and profile, new serial."""
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.errors import AlreadyExists
    from kvpki_cli.pki.csr import decode_csr_bytes, parse_csr
    from kvpki_cli.signing import default_requester, encode_issued, read_input

    if fmt == "der" and with_chain:
        raise UsageError("--chain needs --format pem, pkcs7 or json (DER holds one certificate)")
    lifetime = parse_duration(validity, what="--validity") if validity else None
    window = parse_duration(after_expiry, what="--renew-after-expiry") if after_expiry else None
    authority = obj.authority(ca_name)
    old = _load_certificate(read_input(cert_file))
    csr_der = decode_csr_bytes(read_input(csr_file))
    request = authority.renewal_request(old, csr_der, parse_csr(csr_der), requester or default_requester(), window)
    issued = authority.issue(request._replace(validity=lifetime))
    if revoke_old:
        with contextlib.suppress(AlreadyExists):  # revoked meanwhile: the outcome asked for
            authority.revoke(authority.serial_of(old), "superseded")
    for note in issued.notes:
        warn(note)
    _write_stdout(encode_issued(issued, fmt, with_chain), issued=(issued.record.serial, authority.name))


def _load_certificate(data: bytes) -> Any:
    from kvpki_cli.pki.pem import load_certificate

    return load_certificate(data)


@cli.command("init-ocsp-responder")
@click.option("--ca", "ca_name", required=True, help="Name of the CA the responder answers for.")
@click.option("--validity", default="7d", show_default=True, help="Lifetime; `serve` renews it with 1/3 left.")
@click.pass_obj
def init_ocsp_responder_command(obj: Context, ca_name: str, validity: str) -> None:
    """Issue a delegated OCSP responder certificate (key kept locally); print it. `serve` then signs OCSP with it."""
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.ocsp_responder import issue_responder, responder_root
    from kvpki_cli.pki.keys import Encoding
    from kvpki_cli.signing import default_requester

    authority = obj.authority(ca_name)
    certificate = issue_responder(authority, parse_duration(validity, what="--validity"), default_requester())
    _write_stdout(certificate.public_bytes(Encoding.PEM), issued=(f"{certificate.serial_number:x}", ca_name))
    info(
        f"OCSP responder {certificate.serial_number:x} for CA {ca_name} stored in {responder_root(authority)};"
        " a running 'kvpki serve' uses it within a minute"
    )


@cli.command("crl")
@click.option("--ca", "ca_name", required=True, help="Name of the CA.")
@click.option("--format", "fmt", type=click.Choice(("pem", "der")), default="pem", show_default=True)
@click.option("--next-update", default="7d", show_default=True, help="How long the CRL is valid.")
@click.option("--new", "force_new", is_flag=True, help="Sign a new CRL even if the stored one is current.")
@click.option(
    "--partition",
    type=click.IntRange(min=0),
    help="Print partition K's CRL (a CA with crl_partition_size): its certificates only, with an IDP.",
)
@click.option(
    "--generation",
    type=click.IntRange(0),
    help="The CRL of this key generation (see `kvpki rollover`; default: the current key's).",
)
@click.pass_obj
def crl_command(
    obj: Context,
    ca_name: str,
    fmt: str,
    next_update: str,
    force_new: bool,
    partition: int | None,
    generation: int | None,
) -> None:
    """Print the CA's current CRL (every revoked, unexpired certificate), shared with `kvpki serve`.

    The CRL stored in the inventory is printed if nothing was revoked since, it has the requested
    validity and less than half of it has passed; otherwise (or with --new) a new one is signed and stored.
    """

    from kvpki_cli.crl_publish import published_crl
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.pki.crl import pem

    validity = parse_duration(next_update, what="--next-update")
    authority = obj.authority(ca_name)
    der = published_crl(
        authority, validity, exact_validity=True, new=force_new, partition=partition, generation=generation
    ).der
    _write_stdout(pem(der) if fmt == "pem" else der)


@cli.command("rollover")
@click.option("--ca", "ca_name", required=True, help="Name of the CA whose key is replaced.")
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Type of the new key (default: the CA's).")
@click.option("--validity", help="Lifetime of the new CA certificate (default: the current one's).")
@click.pass_obj
def rollover_command(obj: Context, ca_name: str, key_type: str | None, validity: str | None) -> None:
    """Give a CA a new key and certificate (same subject); issuance switches to it at once.

    Prints the new CA certificate, then for a root the cross-certificates NewWithOld and OldWithNew.
    The previous key keeps signing CRLs and OCSP for what it issued (`kvpki crl --generation K`).
    """
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.pki.encoding import encode_certificates
    from kvpki_cli.rollover import rollover

    result = rollover(
        obj.settings,
        ca_name,
        KeyType(key_type) if key_type else None,
        parse_duration(validity, what="--validity") if validity else None,
    )
    extra = [c for c in (result.new_with_old, result.old_with_new) if c is not None]
    _write_stdout(encode_certificates([result.chain[0], *extra], "pem"))
    sys.stderr.write(
        f"kvpki: CA {ca_name} now issues with key generation {result.generation}; generation"
        f" {result.generation - 1} keeps signing CRLs and OCSP for what it issued; a running 'kvpki serve'"
        " publishes the new chain within seconds\n"
    )


@cli.command("list")
@click.option("--ca", "ca_name", required=True, help="Name of the CA.")
@click.option("--status", type=click.Choice(("valid", "revoked", "expired")), help="Only certificates in this state.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout instead of a table on stderr.")
@click.option("--expiring", help="Only valid certificates expiring within this window, e.g. 30d (soonest first).")
@click.pass_obj
def list_command(obj: Context, ca_name: str, status: str | None, as_json: bool, expiring: str | None) -> None:
    """List the certificates a CA issued (a table on stderr, or JSON on stdout for scripts)."""
    from collections.abc import Iterable

    from kvpki_cli.authority import utcnow
    from kvpki_cli.inventory.base import CertificateRecord

    authority = obj.authority(ca_name)
    now = utcnow()
    records: Iterable[CertificateRecord]
    if expiring is not None:
        from kvpki_cli.report import expiring_records

        records = expiring_records(authority, status, expiring, now)
    else:  # streamed: 100k+ rows are never all in memory (listing.py)
        records = authority.inventory.iter_certificates(authority.name, status, now, with_der=False)
    if as_json:
        from kvpki_cli.listing import write_json_array

        write_json_array(record.as_json(now) for record in records)
        return
    from kvpki_cli.tables import print_certificate_table

    print_certificate_table([record.as_json(now) for record in records])


def run_click(args: Sequence[str]) -> int:
    """Run click without its own error printing; click's errors become usage errors (exit 2)."""
    try:
        result = cli.main(args=list(args), prog_name="kvpki", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        sys.stderr.write(exc.ctx.get_help() + "\n" if exc.ctx else "")
        return EXIT_USAGE
    except click.ClickException as exc:
        raise UsageError(exc.format_message()) from None
    except click.exceptions.Abort:
        raise KvpkiError("aborted") from None
    return result if isinstance(result, int) else 0


@cli.command("serve")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Serve config (TOML).")
@click.option("--host", help="Listen address (overrides [server] host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port, 0 for any free port (overrides config).")
@click.pass_obj
def serve_command(obj: Context, config_path: str, host: str | None, port: int | None) -> None:
    """Run the EST (RFC 7030) server with CRL and OCSP publishing over HTTPS (see docs/serve.md)."""
    import dataclasses

    from kvpki_cli.serve.app import run
    from kvpki_cli.serve.config import load_serve_config

    config = load_serve_config(Path(config_path))
    config = dataclasses.replace(config, host=host or config.host, port=config.port if port is None else port)
    run(obj.settings, config)


@cli.command("serve-passwd")
@click.argument("users_file", type=click.Path(dir_okay=False))
@click.argument("user")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--delete", is_flag=True, help="Remove the user instead.")
def serve_passwd_command(users_file: str, user: str, password_stdin: bool, delete: bool) -> None:
    """Add, update or remove an EST user (scrypt-hashed password) in USERS_FILE."""
    from kvpki_cli.serve.passwd import set_user

    password: str | None = None
    if not delete:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    set_user(Path(users_file), user, password)
    info(f"{'removed' if delete else 'set password for'} {user} in {users_file}")


@cli.command("report")
@click.option("--ca", "ca_name", help="Only this CA (default: every CA in the inventory).")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout instead of a table on stderr.")
@click.pass_obj
def report_command(obj: Context, ca_name: str | None, as_json: bool) -> None:
    """Per CA and profile: valid, due for renewal (last 20% of life), expired without successor, revoked."""
    import json

    from kvpki_cli.report import lifecycle_report, print_report_table

    report = lifecycle_report(obj.settings, obj.authority(ca_name) if ca_name else None)
    if as_json:
        _write_stdout((json.dumps(report, indent=2) + "\n").encode())
        return
    print_report_table(report)


@cli.command("dps-verification")
@click.option("--ca", "ca_name", required=True, help="The CA registered in DPS / IoT Hub.")
@click.option("--code", required=True, help="The verification code DPS or IoT Hub shows for the CA certificate.")
@click.option("--validity", default="1d", show_default=True, help="Lifetime (at most 30d).")
@click.pass_obj
def dps_verification_command(obj: Context, ca_name: str, code: str, validity: str) -> None:
    """Print the proof-of-possession certificate (CN = CODE, signed by the CA, throwaway key) to upload."""
    from kvpki_cli.dps_verification import issue_verification
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.pki.keys import Encoding
    from kvpki_cli.signing import default_requester

    authority = obj.authority(ca_name)
    certificate = issue_verification(
        authority, code, parse_duration(validity, what="--validity"), default_requester()
    )
    _write_stdout(certificate.public_bytes(Encoding.PEM), issued=(format(certificate.serial_number, "x"), ca_name))


@cli.command("dps-disable")
@click.argument("serial")
@click.option("--ca", "ca_name", required=True, help="Name of the CA that issued the certificate.")
@click.option("--dps", "dps_url", help="https://<name>.azure-devices-provisioning.net (default: the CA's dps_url).")
@click.pass_obj
def dps_disable_command(obj: Context, serial: str, ca_name: str, dps_url: str | None) -> None:
    """Create (or disable) the DPS individual enrollment of a certificate's device; prints it as JSON."""
    import json

    from kvpki_cli.dps_cli import dps_disable

    result = dps_disable(obj.settings, obj.authority(ca_name), serial, dps_url)
    _write_stdout(
        (json.dumps(result.as_json(), indent=2) + "\n").encode(),
        committed=(f"the DPS step for serial {serial}", f"kvpki dps-disable {serial} --ca {ca_name}"),
    )
