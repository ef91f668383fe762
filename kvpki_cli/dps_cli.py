"""The DPS step of ``kvpki revoke`` and the ``kvpki dps-disable`` command, between the CLI and ``dps``.

Kept out of ``cli.py`` so the revoke command gains two lines, and out of ``dps``
so planning (config lookup, registration ID checks) never imports the HTTP or
Azure code when no DPS is configured.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kvpki_cli.errors import KvpkiError, NotFound, UsageError

if TYPE_CHECKING:
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.dps import DpsResult, DpsTarget


def _target(authority: CertificateAuthority, serial: str, url: str) -> DpsTarget | None:
    from kvpki_cli.authority import parse_serial
    from kvpki_cli.dps import target_for
    from kvpki_cli.pki.pem import load_certificate

    canonical = parse_serial(serial)
    record = authority.inventory.get(authority.name, canonical)
    if record is None:
        return None
    return target_for(url, authority.name, canonical, load_certificate(record.der))


def plan_dps_step(
    settings: Settings, authority: CertificateAuthority, serial: str, dps_url: str | None, no_dps: bool
) -> DpsTarget | None:
    """What the DPS step will do, validated before the revocation commits (None: no DPS step).

    A usage problem (bad URL, a certificate without a usable CN) stops the command before
    anything changes, not after the certificate is already revoked.
    """
    if no_dps and dps_url:
        raise UsageError("give --dps URL or --no-dps, not both")
    from kvpki_cli.dps import configured_url

    url = None if no_dps else dps_url or configured_url(settings.file_config, authority.name)
    if not url:
        return None
    return _target(authority, serial, url)


def _report(result: DpsResult) -> None:
    sys.stderr.write(
        f"kvpki: DPS {result.url}: individual enrollment {result.registration_id} {result.outcome}"
        " (provisioningStatus disabled): the device cannot provision again\n"
    )


def run_dps_step(settings: Settings, target: DpsTarget | None) -> dict[str, object] | None:
    """Disable the enrollment after the local revocation; any failure names the command that repeats it."""
    if target is None:
        return None
    from kvpki_cli.dps import DpsStepFailed, disable_enrollment

    try:
        result = disable_enrollment(target, settings.home)
    except Exception as exc:  # whatever went wrong, the revocation stands: say so
        reason = str(exc) if isinstance(exc, KvpkiError) else f"{type(exc).__name__}: {exc}"
        raise DpsStepFailed(
            f"revoked {target.serial} locally; DPS step failed: {reason}; re-run with: {target.rerun()}"
        ) from None
    _report(result)
    return result.as_json()


def dps_disable(settings: Settings, authority: CertificateAuthority, serial: str, dps_url: str | None) -> DpsResult:
    """``kvpki dps-disable``: the DPS step alone, for a certificate in the CA's inventory."""
    from kvpki_cli.dps import configured_url, disable_enrollment

    url = dps_url or configured_url(settings.file_config, authority.name)
    if not url:
        raise UsageError(f"no DPS given: use --dps URL or set dps_url in [ca.{authority.name}] of the config file")
    target = _target(authority, serial, url)
    if target is None:
        raise NotFound(f"no certificate with serial {serial} issued by CA {authority.name!r}")
    result = disable_enrollment(target, settings.home)
    _report(result)
    return result
