"""The `sign-csr` command's work, shared by the click command and the start-up fast path.

Reads CSRs, validates all of them before issuing anything, issues them in one
inventory transaction, then writes the results (stdout, or one file each in an
output directory, never overwriting).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kvpki_cli.errors import InvalidInput, KvpkiError, UsageError
from kvpki_cli.messages import warn

if TYPE_CHECKING:
    from kvpki_cli.authority import Issued

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


def write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


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
    """Run `sign-csr`: every CSR is checked before any is signed; rows commit before output."""
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
    targets = output_targets(paths, options.out_dir, options.fmt) if options.out_dir else []
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

    authority = CertificateAuthority.open(settings, options.ca_name)
    issued = authority.issue_many(requests)
    for note in sorted({n for item in issued for n in item.notes}):
        warn(note)
    outputs = [encode_issued(item, options.fmt, options.with_chain) for item in issued]
    if not options.out_dir:
        write_stdout(outputs[0])
        return
    from kvpki_cli.fileutil import write_file_atomic

    for target, data in zip(targets, outputs, strict=True):
        write_file_atomic(target, data, mode=0o644, overwrite=False, durable=False)
    sys.stderr.write(f"kvpki: issued {len(outputs)} certificate(s) into {options.out_dir}\n")


def output_targets(paths: Sequence[str], out_dir: str, fmt: str) -> list[Path]:
    """One output file per input, checked before anything is issued (no clobbering, no duplicates)."""
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out-dir {out_dir}: {exc.strerror}") from None
    targets = []
    for path in paths:
        name = "stdin" if path == "-" else Path(path).name
        for suffix in (".csr", ".pem", ".der", ".req", ".b64"):
            name = name.removesuffix(suffix)
        targets.append(directory / f"{name}{OUTPUT_SUFFIX[fmt]}")
    if len(set(targets)) != len(targets):
        raise UsageError("two CSRs would write the same output file (their file names collide)")
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise UsageError(f"refusing to overwrite {existing[0]}")
    return targets


def encode_issued(item: Issued, fmt: str, with_chain: bool) -> bytes:
    from kvpki_cli.pki.encoding import encode_certificates

    certs = [item.certificate, *item.chain] if with_chain else [item.certificate]
    return encode_certificates(certs, fmt, {"profile": item.record.profile})
