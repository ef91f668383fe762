"""Path validation with revocation by pyhanko-certvalidator, an RFC 5280 validator nobody here wrote."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import RevokedError

from tests.conftest import Kvpki
from tests.helpers import load_cert, pkilint_findings, write


def _validator(leaf: bytes, issuing: bytes, root: bytes, crls: list[bytes]) -> CertificateValidator:
    from asn1crypto import pem, x509

    def cert(data: bytes) -> x509.Certificate:
        return x509.Certificate.load(pem.unarmor(data)[2])

    context = ValidationContext(trust_roots=[cert(root)], crls=crls, revocation_mode="hard-fail", allow_fetching=False)
    return CertificateValidator(cert(leaf), intermediate_certs=[cert(issuing)], validation_context=context)


def test_pyhanko_validates_chain_and_sees_revocation(kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    (kvpki.home / "config.toml").write_text('[defaults]\nbase_url = "http://pki.example.test"\n')
    root = kvpki.init_ca("root", "--subject", "CN=PV Root")
    issuing = kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=PV Issuing")
    good = kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=pv-good").csr_pem)
    bad = kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=pv-bad").csr_pem)
    [serial] = [row["serial"] for row in kvpki.inventory("issuing") if row["subject"] == "CN=pv-bad"]
    kvpki.ok("revoke", str(serial), "--ca", "issuing", "--reason", "keyCompromise")
    crls = [kvpki.ok("crl", "--ca", "root", "--format", "der"), kvpki.ok("crl", "--ca", "issuing", "--format", "der")]

    # the certificates carry the publication URLs, and still lint clean
    cert = load_cert(good)
    crl_dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert crl_dp[0].full_name[0].value == "http://pki.example.test/crl/issuing.crl"
    aia = {
        d.access_method.dotted_string: d.access_location.value
        for d in cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    }
    assert aia == {
        "1.3.6.1.5.5.7.48.1": "http://pki.example.test/ocsp/issuing",
        "1.3.6.1.5.5.7.48.2": "http://pki.example.test/ca/issuing.crt",
    }
    assert pkilint_findings(write(tmp_path / "good.pem", good)) == ""
    assert pkilint_findings(write(tmp_path / "issuing.pem", issuing)) == ""

    path = asyncio.run(
        _validator(good, issuing, root, crls).async_validate_usage({"digital_signature"}, {"client_auth"})
    )
    assert len(path) == 3
    with pytest.raises(RevokedError):
        asyncio.run(_validator(bad, issuing, root, crls).async_validate_usage({"digital_signature"}))
