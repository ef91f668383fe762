"""The `sign-csr` command's work, shared by the click command and the start-up fast path.

Reads CSRs and checks all of them (and every output name) before issuing
anything, encodes and stages the results before the one inventory transaction,
then writes them: to stdout (a failure there names the committed serial), or
one file each into an output directory with the crash-safe protocol of
``kvpki_cli.outdir``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kvpki_cli.errors import AlreadyExists, BackendError, InvalidInput, KvpkiError, NotFound, UsageError
from kvpki_cli.messages import info, warn

if TYPE_CHECKING:
    from kvpki_cli.authority import CertificateAuthority, Issued, SigningRequest
    from kvpki_cli.config import Settings

OUTPUT_SUFFIX = {"pem": ".pem", "der": ".der", "pkcs7": ".p7b", "json": ".json"}


class SignOptions(NamedTuple):
    """The arguments of `kvpki sign-csr`, already split but not yet validated."""

    ca_name: str
    csr_files: Sequence[str] = ()
    profile: str = "device"
    validity: str | None = None
    subject: str | None = None
    sans: Sequence[str] = ()
    path_length: int | None = None
    with_chain: bool = False
    fmt: str = "pem"
    requester: str | None = None
    out_dir: str | None = None
    home: str | None = None
    jobs: int | None = None  # signatures in flight (None: the key store's default)


class OutputFailed(BackendError):
    """stdout could not take the result (full disk, closed pipe); the line says how to recover what was issued."""


def write_stdout(
    data: bytes, issued: tuple[str, str] | None = None, committed: tuple[str, str] | None = None
) -> None:
    """Write the result; on failure raise one error line, naming the (serial, CA) already committed if any.

    The failed output is discarded (stdout now points at /dev/null), so the
    interpreter's final flush cannot fail a second time with a traceback.
    """
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        discard_stdout()
        reason = "stdout was closed" if isinstance(exc, BrokenPipeError) else f"cannot write to stdout: {exc.strerror}"
        if committed is not None:  # (what was done, the command that shows it again)
            raise OutputFailed(f"output failed after {committed[0]} ({reason}); see it with: {committed[1]}") from None
        if issued is None:
            raise OutputFailed(reason) from None
        serial, ca = issued
        raise OutputFailed(
            f"output failed after issuing serial {serial} ({reason});"
            f" recover it with: kvpki get-cert {serial} --ca {ca}"
        ) from None


def discard_stdout() -> None:
    """Point fd 1 at /dev/null so buffered output still pending is dropped quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def read_input(path: str) -> bytes:
    """Read a CSR/certificate from a file or ``-`` (stdin), refusing oversized input early."""
    from kvpki_cli.pki.csr import MAX_CSR_BYTES

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_CSR_BYTES + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(MAX_CSR_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CSR_BYTES:
        raise InvalidInput(f"input {path} is too large (limit {MAX_CSR_BYTES} bytes)")
    return data


def default_requester() -> str:
    explicit = os.environ.get("KVPKI_REQUESTER")
    if explicit:
        return explicit
    try:
        import pwd

        return "cli:" + pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "cli"


def sign_csrs(options: SignOptions) -> None:
    """Run `sign-csr`: every CSR and output target is checked before any is signed; rows commit before output."""
    from kvpki_cli.authority import CertificateAuthority, SigningRequest
    from kvpki_cli.config import Settings
    from kvpki_cli.durations import parse_duration
    from kvpki_cli.pki.csr import decode_csr_bytes, parse_csr
    from kvpki_cli.pki.names import parse_san, parse_subject

    paths = list(options.csr_files) or ["-"]
    if len(paths) > 1 and not options.out_dir:
        raise UsageError("several CSRs need --out-dir (one output file per CSR)")
    if paths.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if options.fmt not in OUTPUT_SUFFIX:
        raise UsageError(f"unknown format {options.fmt!r} (one of: {', '.join(OUTPUT_SUFFIX)})")
    if options.fmt == "der" and options.with_chain:
        raise UsageError("--chain needs --format pem, pkcs7 or json (DER holds one certificate)")
    out_dir = prepare_out_dir(options.out_dir) if options.out_dir else None
    names = output_names(paths, options.fmt)
    settings = Settings.load(Path(options.home).expanduser() if options.home else None)
    settings.profile(options.profile)  # unknown profile: a usage error before reading input
    common = {
        "profile": options.profile,
        "requester": options.requester or default_requester(),
        "validity": parse_duration(options.validity, what="--validity") if options.validity else None,
        "subject": parse_subject(options.subject) if options.subject else None,
        "sans": [parse_san(s) for s in options.sans] or None,
        "path_length": options.path_length,
    }
    requests = []
    for path in paths:
        try:
            der = decode_csr_bytes(read_input(path))
            csr = parse_csr(der)
        except KvpkiError as exc:
            if len(paths) > 1:
                raise type(exc)(f"{path}: {exc}") from None
            raise
        requests.append(SigningRequest(csr_der=der, csr=csr, **common))  # type: ignore[arg-type]

    if out_dir is not None:
        _sign_into_directory(settings, options, requests, out_dir, names)
        return
    authority = CertificateAuthority.open(settings, options.ca_name)
    outputs: list[bytes] = []

    def encode(issued: list[Issued]) -> None:  # before the commit: nothing can fail between commit and write
        outputs[:] = [encode_issued(item, options.fmt, options.with_chain) for item in issued]

    issued = authority.issue_many(requests, before_commit=encode, jobs=options.jobs)
    _warn_notes(issued)
    write_stdout(outputs[0], issued=(issued[0].record.serial, authority.name))


def _warn_notes(issued: Sequence[Issued]) -> None:
    for note in sorted({n for item in issued for n in item.notes}):
        warn(note)


def _sign_into_directory(
    settings: Settings, options: SignOptions, requests: Sequence[SigningRequest], directory: Path, names: list[str]
) -> None:
    """Issue into ``directory`` with the protocol of ``kvpki_cli.outdir``: files synced before the commit."""
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.inventory import open_inventory
    from kvpki_cli.outdir import Batch, check_targets, inventory_fingerprint, recover

    inventory = open_inventory(settings.inventory_url, settings.home)
    fingerprint = inventory_fingerprint(settings.inventory_url or str((settings.home / "inventory.sqlite3").resolve()))

    def committed(ca: str, serial: str) -> bool:
        return inventory.get(ca, serial) is not None

    placed = recover(directory, fingerprint, committed)
    if placed:
        warn(f"wrote {placed} certificate(s) of an interrupted earlier batch into {directory}")
    targets = check_targets(directory, names)
    authority = CertificateAuthority.open(settings, options.ca_name, inventory)
    batch = Batch.begin(directory, authority.name, fingerprint)

    def stage(issued: list[Issued]) -> None:
        outputs = [encode_issued(item, options.fmt, options.with_chain) for item in issued]
        batch.stage(
            [(item.record.serial, target, out) for item, target, out in zip(issued, targets, outputs, strict=True)]
        )

    try:
        issued = authority.issue_many(requests, before_commit=stage, jobs=options.jobs)
    except BaseException:
        try:
            batch.settle(committed)  # an ambiguous commit error: what did commit is still written
        except Exception:
            batch.close(remove_manifest=False)  # the inventory cannot say: a later run settles it
        raise
    unplaced = batch.publish()
    _warn_notes(issued)
    if unplaced:
        raise AlreadyExists(
            f"{len(unplaced)} certificate(s) were issued but their file names in {directory} were taken meanwhile;"
            f" recover with: kvpki get-cert {unplaced[0]} --ca {authority.name} (serials: {', '.join(unplaced)})"
        )
    info(f"issued {len(issued)} certificate(s) into {directory}")


def output_names(paths: Sequence[str], fmt: str) -> list[str]:
    """One output file name per input (the CSR file name with the format's suffix)."""
    names = []
    for path in paths:
        name = "stdin" if path == "-" else Path(path).name
        for suffix in (".csr", ".pem", ".der", ".req", ".b64"):
            name = name.removesuffix(suffix)
        names.append(f"{name}{OUTPUT_SUFFIX[fmt]}")
    return names


def prepare_out_dir(out_dir: str) -> Path:
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out-dir {out_dir} is not a directory") from None
    except OSError as exc:  # the same exit as an existing directory that cannot be written
        raise BackendError(f"cannot create --out-dir {out_dir}: {exc.strerror}") from None
    return directory


def encode_issued(item: Issued, fmt: str, with_chain: bool) -> bytes:
    from kvpki_cli.pki.encoding import encode_certificates

    certs = [item.certificate, *item.chain] if with_chain else [item.certificate]
    return encode_certificates(certs, fmt, {"profile": item.record.profile})


def stored_certificate(authority: CertificateAuthority, serial: str, fmt: str, with_chain: bool) -> bytes:
    """Any certificate ``authority`` issued, encoded from its inventory row (revoked and expired ones too)."""
    from cryptography import x509

    from kvpki_cli.authority import parse_serial, utcnow
    from kvpki_cli.pki.encoding import encode_certificates

    if fmt == "der" and with_chain:
        raise UsageError("--chain needs --format pem, pkcs7 or json (DER holds one certificate)")
    canonical = parse_serial(serial)
    record = authority.inventory.get(authority.name, canonical)
    if record is None:
        raise NotFound(f"no certificate with serial {canonical} in the inventory of CA {authority.name!r}")
    certificate = x509.load_der_x509_certificate(record.der)
    # the chain of the key generation that signed it (kvpki rollover)
    certs = [certificate, *authority.generation(record.issuer_generation).chain] if with_chain else [certificate]
    stored = record.as_json(utcnow())
    extra = {key: stored[key] for key in ("profile", "status", "revoked_at", "reason", "requester")}
    return encode_certificates(certs, fmt, extra)
