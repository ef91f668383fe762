"""The sign-csr start-up fast path agrees with click wherever it answers, and stays free of heavy imports.

Expectations come from click itself: every generated command line that the
fast path accepts must give exactly the SignOptions that the click command
(`sign_csr_command`, parsed by `make_context` and invoked) would hand to
`sign_csrs`.  Anything the fast path declines goes to click, so declining is
always allowed; accepting something click reads differently is the bug class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpki_cli import signing
from kvpki_cli.cli import Context, sign_csr_command
from kvpki_cli.fastpath import parse_fast_sign
from kvpki_cli.signing import SignOptions
from tests.conftest import KVPKI, Kvpki

FUZZ_CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "400"))


def click_reading(args: Sequence[str], monkeypatch: pytest.MonkeyPatch) -> SignOptions | None:
    """The SignOptions click's own `sign-csr` command builds from ``args`` (None when click refuses them)."""
    captured: list[SignOptions] = []
    with monkeypatch.context() as patch:
        patch.setattr(signing, "sign_csrs", captured.append)
        try:
            with sign_csr_command.make_context("sign-csr", list(args), obj=Context(None)) as ctx:
                sign_csr_command.invoke(ctx)
        except (click.ClickException, click.exceptions.Exit):
            return None
    (options,) = captured
    return options


OPTION_TOKENS = [
    "--ca", "--profile", "--format", "--requester", "--validity", "--subject", "--chain", "--san",
    "--out-dir", "--path-length", "--help", "-h", "--", "-", "--c", "--chai", "--form", "--debug", "--home", "--jobs",
]  # fmt: skip
VALUE_TOKENS = [
    "x", "sub", "a.csr", "b.der", "", "-", "-x", "--ca", "--chain", "pem", "der", "json", "pkcs7", "xml", "PEM",
    "device", "server", "CN=a,O=b", "30d", "1y", "=", "a=b", "é", " ", "DNS:a", "0",
]  # fmt: skip


@st.composite
def sign_csr_args(draw: st.DrawFn) -> list[str]:
    """Command lines near the fast path's edge: real and near-miss options, inline '=' values, stray inputs."""
    args: list[str] = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["option", "option=value", "value"]))
        if kind == "option":
            args.append(draw(st.sampled_from(OPTION_TOKENS)))
        elif kind == "option=value":
            args.append(draw(st.sampled_from(OPTION_TOKENS)) + "=" + draw(st.sampled_from(VALUE_TOKENS)))
        else:
            args.append(draw(st.sampled_from(VALUE_TOKENS)))
    if draw(st.booleans()):  # most real calls name a CA
        position = draw(st.integers(0, len(args)))
        args[position:position] = ["--ca", draw(st.sampled_from(["x", "root", "-"]))]
    return args


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=sign_csr_args())
def test_fast_path_reads_what_click_reads(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = parse_fast_sign(["sign-csr", *args])
    if fast is not None:
        assert fast == click_reading(args, monkeypatch), args


@pytest.mark.parametrize(
    "args",
    [
        ["--ca", "x"],
        ["-", "--ca=x", "--chain"],
        ["d.csr", "--ca", "x", "--profile", "server", "--format", "json", "--requester", "est:alice"],
        ["--ca", "x", "--validity", "30d", "--subject", "CN=a"],
        ["--format=der", "--ca", "x", "-"],
        ["--ca", "x", "--subject", "-odd-but-a-value"],
    ],
)
def test_plain_forms_take_the_fast_path(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = parse_fast_sign(["sign-csr", *args])
    assert fast is not None and fast == click_reading(args, monkeypatch)


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
        ["sign-csr", "--ca", "x", "--out-dir", "d"],
        ["--home", "/tmp", "sign-csr", "--ca", "x"],
        ["get-ca", "--ca", "x"],
    ],
)
def test_everything_else_goes_to_click(argv: list[str]) -> None:
    assert parse_fast_sign(argv) is None


HEAVY = ("click", "rich", "azure", "aiohttp", "cryptography.hazmat.primitives.serialization")
PROBE = """
import json, runpy, sys
args, heavy_names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["kvpki", *args]
try:
    runpy.run_module("kvpki_cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy_names))
sys.stderr.write("PROBE " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def imports_of(kvpki: Kvpki, args: list[str], stdin: bytes, env: dict[str, str]) -> dict[str, object]:
    """Run kvpki in a subprocess and report which heavy modules it imported (from sys.modules at exit)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=kvpki.home,
        timeout=60,
    )
    line = [x for x in result.stderr.decode().splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line.removeprefix("PROBE "))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "args",
    [["sign-csr", "--ca", "fp"], ["sign-csr", "-", "--ca", "fp", "--format", "json", "--chain"]],
)
def test_plain_sign_csr_imports_nothing_heavy(local_kvpki: Kvpki, make_csr, args: list[str]) -> None:
    local_kvpki.init_ca("fp", "--subject", "CN=Fast Path CA")
    csr = make_csr("/CN=lean").csr_pem
    assert imports_of(local_kvpki, args, csr, local_kvpki.env) == {"code": 0, "heavy": []}
    # the probe sees them when they are imported: the same call through click
    slow = imports_of(local_kvpki, args, csr, dict(local_kvpki.env, KVPKI_NO_FASTPATH="1"))
    assert slow["code"] == 0 and "click" in slow["heavy"]  # type: ignore[operator]


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


def test_kvpki_runs_from_the_worktree() -> None:
    """The probe runs `python -m kvpki_cli` like conftest's KVPKI does (guards against testing another copy)."""
    assert KVPKI[1:] == ["-m", "kvpki_cli"] and Path(signing.__file__).resolve().is_relative_to(
        Path(__file__).resolve().parent.parent
    )
