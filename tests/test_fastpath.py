"""The sign-csr start-up fast path accepts only plain forms and defers everything else to click."""

from __future__ import annotations

import json

import pytest

from kvpki_cli.fastpath import parse_fast_sign
from kvpki_cli.signing import SignOptions
from tests.conftest import Kvpki


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sign-csr", "--ca", "x"], SignOptions(ca_name="x")),
        (["sign-csr", "-", "--ca=x", "--chain"], SignOptions(ca_name="x", csr_files=("-",), with_chain=True)),
        (
            ["sign-csr", "d.csr", "--ca", "x", "--profile", "server", "--format", "json", "--requester", "est:alice"],
            SignOptions(ca_name="x", csr_files=("d.csr",), profile="server", fmt="json", requester="est:alice"),
        ),
        (
            ["sign-csr", "--ca", "x", "--validity", "30d", "--subject", "CN=a"],
            SignOptions(ca_name="x", validity="30d", subject="CN=a"),
        ),
    ],
)
def test_plain_forms_take_the_fast_path(argv: list[str], expected: SignOptions) -> None:
    assert parse_fast_sign(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["sign-csr"],  # missing --ca: click reports it
        ["sign-csr", "--help"],
        ["sign-csr", "--ca", "x", "--san", "DNS:a"],  # options the fast path does not know
        ["sign-csr", "--ca", "x", "--ca", "y"],
        ["sign-csr", "--ca"],
        ["sign-csr", "--ca", "--chain"],
        ["sign-csr", "--ca", "x", "a.csr", "b.csr"],
        ["sign-csr", "--ca", "x", "--format", "xml"],
        ["sign-csr", "--ca", "x", "-f"],
        ["--home", "/tmp", "sign-csr", "--ca", "x"],
        ["get-ca", "--ca", "x"],
    ],
)
def test_everything_else_goes_to_click(argv: list[str]) -> None:
    assert parse_fast_sign(argv) is None


def test_fast_and_click_paths_issue_alike(local_kvpki: Kvpki, make_csr) -> None:
    local_kvpki.init_ca("fp", "--subject", "CN=Fast Path CA")
    args = ("sign-csr", "--ca", "fp", "--format", "json", "--chain", "--requester", "compare")
    fast = json.loads(local_kvpki.ok(*args, input=make_csr("/CN=same").csr_pem))
    local_kvpki.env = dict(local_kvpki.env, KVPKI_NO_FASTPATH="1")
    slow = json.loads(local_kvpki.ok(*args, input=make_csr("/CN=same").csr_pem))
    for key in ("subject", "issuer", "sans", "profile", "chain"):
        assert fast[key] == slow[key]
    assert fast["serial"] != slow["serial"]
    assert [row["requester"] for row in local_kvpki.inventory("fp")] == ["compare", "compare"]
    # the same bad input gets the same one-line error either way
    slow_err = local_kvpki.run("sign-csr", "--ca", "fp", input=b"junk")
    local_kvpki.env.pop("KVPKI_NO_FASTPATH")
    fast_err = local_kvpki.run("sign-csr", "--ca", "fp", input=b"junk")
    assert (fast_err.returncode, fast_err.stderr) == (slow_err.returncode, slow_err.stderr) == (3, slow_err.stderr)
