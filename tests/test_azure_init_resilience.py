"""Azure init-ca under failure: nothing is deleted, the same init-ca resumes, lost replies are read back.

Every test runs the kvpki CLI as a subprocess (real Azure SDK, real DefaultAzureCredential)
against the Key Vault test server with purge protection on, as the README's
``az keyvault create`` sets it: a deleted certificate would burn the CA name for 90 days.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import Kvpki, make_env
from tests.helpers import load_cert, openssl_verify
from tests.kvserver.fixtures import azure_init_args
from tests.kvserver.server import FaultRule, KeyVaultTestServer

NAME = "root"
CREATE = r"^/certificates/root/create$"
MERGE = r"^/certificates/root/pending/merge$"
PENDING = r"^/certificates/root/pending$"
VERSION = r"^/certificates/root/[0-9a-f]{32}$"


@pytest.fixture
def az(tmp_path: Path, kv: KeyVaultTestServer, azure_store_setup: Callable[[], Any]) -> Kvpki:
    kv.vault.purge_protection = True
    setup = azure_store_setup()
    home = tmp_path / "home"
    home.mkdir()
    return Kvpki(home, make_env(home, setup.env), setup)


def init(az: Kvpki, kv: KeyVaultTestServer, *args: str, name: str = NAME) -> subprocess.CompletedProcess[bytes]:
    return az.run("init-ca", "--name", name, "--subject", "CN=Resilient Root", *azure_init_args(kv), *args)


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.stdout == b"", result.stdout
    assert stderr.count("\n") == 1 and stderr.startswith("kvpki: error: "), stderr
    assert "Traceback" not in stderr
    return stderr


def assert_nothing_deleted(kv: KeyVaultTestServer, name: str = "root") -> None:
    assert not [e for e in kv.log if e.method == "DELETE"], [(e.method, e.path) for e in kv.log]
    cert = kv.vault.certs.get(name)
    assert cert is None or cert.deleted_at is None


def assert_ca_works(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path, temporary_disabled: bool = True
) -> None:
    """The CA signs, the result verifies with openssl, and the CA key is the vault certificate's key."""
    root = load_cert(root_pem)
    vault_cert = kv.vault.certs[NAME]
    enabled = [v for v in vault_cert.versions if v.der is not None and v.enabled]
    assert x509.load_der_x509_certificate(enabled[-1].der or b"") == root
    assert len(enabled) == 1 or not temporary_disabled
    result = az.run("sign-csr", "--ca", NAME, input=make_csr().csr_pem)
    assert result.returncode == 0, result.stderr
    verified = openssl_verify(tmp_path, root_pem, result.stdout)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# ------------------------------------------------------------------ 8a: transient failures
@pytest.mark.parametrize(
    "rule",
    [
        FaultRule(status=503, count=None, method="POST", path_regex=MERGE),
        FaultRule(kind="drop", count=None, method="POST", path_regex=MERGE),
        FaultRule(status=500, count=None, method="POST", path_regex=CREATE),
        FaultRule(status=503, count=None, method="POST", path_regex=CREATE, skip=1),
        FaultRule(kind="drop", count=None, method="POST", path_regex=CREATE, skip=1),
        FaultRule(status=503, count=None, method="GET", path_regex=PENDING, skip=2),
        FaultRule(status=429, count=None, method="POST", path_regex=MERGE),
    ],
    ids=["merge-503", "merge-drop", "create-500", "pending-create-503", "pending-create-drop", "poll-503", "merge-429"],
)
def test_transient_failure_deletes_nothing_and_the_same_init_ca_resumes(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path, rule: FaultRule
) -> None:
    kv.set_faults(rules=[rule])
    failed = init(az, kv)
    assert failed.returncode == 6, failed.stderr
    assert "run the same init-ca again to continue" in one_error_line(failed)
    assert_nothing_deleted(kv)
    assert not (az.home / "cas" / NAME / "ca.json").exists()
    keys_before = len(kv.vault.keys.get(NAME, []))

    kv.set_faults()
    resumed = init(az, kv)
    assert resumed.returncode == 0, resumed.stderr
    assert_nothing_deleted(kv)
    if keys_before:  # the key made by the failed run is the CA key (the vault made no second key)
        created = {id(v.private_key) for v in kv.vault.keys[NAME]}
        assert len(created) == 1
    assert_ca_works(az, kv, resumed.stdout, make_csr, tmp_path)


def test_merge_503_message_says_what_the_vault_holds(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.set_faults(rules=[FaultRule(status=503, count=None, method="POST", path_regex=MERGE)])
    stderr = one_error_line(init(az, kv))
    assert "merge" in stderr and "503" in stderr, stderr
    assert "keeps its pending version" in stderr and "run the same init-ca again" in stderr, stderr
    assert "recover or purge" not in stderr
    assert kv.vault.certs[NAME].pending is not None  # the pending version is still there to merge


# ------------------------------------------------------------------ 8b: ambiguous outcomes
@pytest.mark.parametrize(
    ("rule", "path", "expected_posts"),
    [
        (FaultRule(kind="apply-then-status", status=504, method="POST", path_regex=MERGE), MERGE, 1),
        (FaultRule(kind="apply-then-drop", method="POST", path_regex=MERGE), MERGE, 1),
        (FaultRule(kind="apply-then-status", status=500, method="POST", path_regex=MERGE), MERGE, 1),
        (FaultRule(kind="apply-then-status", status=504, method="POST", path_regex=CREATE), CREATE, 2),
        (FaultRule(kind="apply-then-status", status=504, method="POST", path_regex=CREATE, skip=1), CREATE, 2),
    ],
    ids=["merge-504", "merge-lost", "merge-500", "self-create-504", "pending-create-504"],
)
def test_applied_request_with_lost_reply_is_read_back_not_repeated(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path, rule: FaultRule, path: str, expected_posts: int
) -> None:
    import re

    kv.set_faults(rules=[rule])
    result = init(az, kv)
    assert result.returncode == 0, result.stderr
    assert rule.count == 0  # the fault really happened
    posts = [e for e in kv.log if e.method == "POST" and re.search(path, e.path)]
    assert len(posts) == expected_posts, [(e.path, e.status) for e in posts]
    assert_nothing_deleted(kv)
    kv.set_faults()
    assert_ca_works(az, kv, result.stdout, make_csr, tmp_path)


# ------------------------------------------------------------------ 8a: states that cannot be resumed
def test_deleted_but_recoverable_is_named_and_recover_then_rerun_resumes(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path
) -> None:
    kv.set_faults(rules=[FaultRule(status=503, count=None, method="POST", path_regex=MERGE)])
    assert init(az, kv).returncode == 6
    kv.set_faults()
    kv.vault.delete_certificate(NAME)  # someone deleted it by hand; purge protection keeps the name
    stderr = one_error_line(refused := init(az, kv))
    assert refused.returncode == 7
    assert "deleted but recoverable" in stderr and "purge scheduled" in stderr, stderr
    assert "az keyvault certificate recover --id" in stderr and "/deletedcertificates/root" in stderr, stderr
    assert kv.vault.purge_certificate(NAME)[0] == 403  # indeed: purging is not a way out
    kv.vault.recover_certificate(NAME)
    resumed = init(az, kv)
    assert resumed.returncode == 0, resumed.stderr
    assert_ca_works(az, kv, resumed.stdout, make_csr, tmp_path)


def test_merged_ca_without_local_metadata_is_refused_and_untouched(
    az: Kvpki, kv: KeyVaultTestServer, tmp_path: Path
) -> None:
    assert init(az, kv).returncode == 0
    versions = [(v.version, v.enabled, v.der) for v in kv.vault.certs[NAME].versions]
    other_home = tmp_path / "other"
    other_home.mkdir()
    other = Kvpki(other_home, make_env(other_home, az.store.env), az.store)
    kv.clear_log()
    refused = init(other, kv)
    assert refused.returncode == 7
    stderr = one_error_line(refused)
    assert "already merged CA certificate (CN=Resilient Root" in stderr and "no metadata" in stderr, stderr
    assert [(v.version, v.enabled, v.der) for v in kv.vault.certs[NAME].versions] == versions
    assert all(e.method == "GET" for e in kv.log if e.kind == "vault")


def test_other_cas_half_built_certificate_is_not_taken_over(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.set_faults(rules=[FaultRule(status=503, count=None, method="POST", path_regex=r"/pending/merge$")])
    assert init(az, kv, "--key-name", "shared", name="first").returncode == 6
    kv.set_faults()
    refused = init(az, kv, "--key-name", "shared", name="second")
    assert refused.returncode == 7
    assert "belongs to CA 'first'" in one_error_line(refused)
    assert kv.vault.certs["shared"].pending is not None


def test_resume_with_another_key_type_is_a_usage_error(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.set_faults(rules=[FaultRule(status=503, count=None, method="POST", path_regex=MERGE)])
    assert init(az, kv).returncode == 6
    kv.set_faults()
    refused = init(az, kv, "--key-type", "ec-p384")
    assert refused.returncode == 2
    assert "--key-type ec-p256" in one_error_line(refused)


def test_foreign_certificate_of_the_same_name_is_refused(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.vault.create_certificate(NAME, {"policy": {"issuer": {"name": "Self"}}})  # not made by kvpki
    refused = init(az, kv)
    assert refused.returncode == 7
    assert "something other than kvpki init-ca" in one_error_line(refused)
    assert_nothing_deleted(kv)


# ------------------------------------------------------------------ 8a: failures after the merge, kills
def test_failure_after_merge_resumes_from_the_merged_certificate(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path
) -> None:
    blocker = az.home / "cas" / NAME / "chain.pem"
    blocker.mkdir(parents=True)  # the local write after the merge fails
    failed = init(az, kv)
    assert failed.returncode == 6, failed.stderr
    assert "merged in the vault" in one_error_line(failed)
    assert kv.vault.certs[NAME].pending is None  # merged
    blocker.rmdir()
    resumed = init(az, kv)
    assert resumed.returncode == 0, resumed.stderr
    assert_nothing_deleted(kv)
    assert_ca_works(az, kv, resumed.stdout, make_csr, tmp_path)  # exactly one enabled version: the new one


@pytest.mark.parametrize("kill_after", [0.6, 1.4, 1.8, 2.2, 2.6, 3.0, 3.4, 3.7, 4.0, 4.4])
def test_kill_at_any_point_then_rerun_finishes_the_ca(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path, kill_after: float
) -> None:
    """SIGKILL during init-ca (vault latency 150 ms spreads the kill points over every step)."""
    import sys
    import time

    kv.set_faults(latency_ms=150)
    args = ["init-ca", "--name", NAME, "--subject", "CN=Resilient Root", *azure_init_args(kv)]
    proc = subprocess.Popen([sys.executable, "-m", "kvpki_cli", *args], env=az.env, cwd=az.home)
    time.sleep(kill_after)
    proc.kill()
    proc.wait()
    kv.set_faults()
    rerun = init(az, kv)
    assert_nothing_deleted(kv)
    if rerun.returncode == 7 and b"already exists" in rerun.stderr:  # the first run finished before the kill
        root_pem = (az.home / "cas" / NAME / "chain.pem").read_bytes()
    else:
        assert rerun.returncode == 0, rerun.stderr
        root_pem = rerun.stdout
    assert_ca_works(az, kv, root_pem, make_csr, tmp_path)


@pytest.mark.parametrize("same_home", [True, False], ids=["same-home", "two-homes"])
def test_concurrent_init_ca_of_one_name_makes_one_ca(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path, same_home: bool
) -> None:
    import sys

    second = az
    if not same_home:
        other_home = tmp_path / "other"
        other_home.mkdir()
        second = Kvpki(other_home, make_env(other_home, az.store.env), az.store)
    kv.set_faults(latency_ms=50)
    args = ["init-ca", "--name", NAME, "--subject", "CN=Resilient Root", *azure_init_args(kv)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kvpki_cli", *args],
            env=runner.env,
            cwd=runner.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for runner in (az, second)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    kv.set_faults()
    assert sorted(code for code, _, _ in results)[0] == 0, results
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert loser[0] in (6, 7) and loser[1] == b"" and loser[2].count(b"\n") == 1, loser
    assert_nothing_deleted(kv)
    winner = (az, second)[winners[0]]
    assert_ca_works(winner, kv, results[winners[0]][1], make_csr, tmp_path)


def test_disable_failure_after_merge_only_warns(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path
) -> None:
    kv.set_faults(rules=[FaultRule(status=503, count=None, method="PATCH")])
    result = init(az, kv)
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.decode()
    assert stderr.startswith("kvpki: warning: could not disable the temporary version"), stderr
    kv.set_faults()
    sign = az.run("sign-csr", "--ca", NAME, input=make_csr().csr_pem)
    assert sign.returncode == 0, sign.stderr
    assert openssl_verify(tmp_path, result.stdout, sign.stdout).returncode == 0


def test_foreign_pending_operation_is_named(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.vault.create_certificate(NAME, {"policy": {"issuer": {"name": "Unknown"}}})  # someone's CSR workflow
    refused = init(az, kv)
    assert refused.returncode == 7
    stderr = one_error_line(refused)
    assert "pending certificate operation (issuer Unknown, inProgress)" in stderr and "did not start" in stderr
    assert kv.vault.certs[NAME].pending is not None
    assert not [e for e in kv.log if e.kind == "vault" and e.method != "GET"]


def test_forbidden_merge_names_the_operation_and_role_and_keeps_the_pending_version(
    az: Kvpki, kv: KeyVaultTestServer
) -> None:
    kv.set_faults(rules=[FaultRule(status=403, count=None, path_regex=MERGE, inner_code="ForbiddenByRbac")])
    refused = init(az, kv)
    assert refused.returncode == 6
    stderr = one_error_line(refused)
    assert "denied certificates/merge" in stderr and "'Key Vault Certificates Officer'" in stderr, stderr
    assert "keeps its pending version" in stderr, stderr
    assert [e.method for e in kv.log if e.path.endswith("/merge")] == ["POST"]  # a 403 is not retried
    assert_nothing_deleted(kv)


def test_sub_ca_merge_failure_resumes_and_cold_cache_chain_links_to_the_root(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path
) -> None:
    root_pem = init(az, kv).stdout
    kv.set_faults(
        rules=[FaultRule(status=503, count=None, method="POST", path_regex=r"^/certificates/sub/pending/merge$")]
    )
    args = ["init-ca", "--name", "sub", "--parent", NAME, "--subject", "CN=Resilient Sub", *azure_init_args(kv)]
    assert az.run(*args).returncode == 6
    assert az.inventory(NAME) == []  # the unmerged attempt is not recorded under the parent
    kv.set_faults()
    sub = az.run(*args)
    assert sub.returncode == 0, sub.stderr
    assert len(az.inventory(NAME)) == 1
    for path in (az.home / "cache" / "azure").glob("*/*.json"):
        if path.name != "install-id.json":
            path.unlink()  # cold: the chain comes from the vault plus the saved issuers
    issued = az.run("sign-csr", "--ca", "sub", "--chain", input=make_csr().csr_pem)
    assert issued.returncode == 0, issued.stderr
    certs = issued.stdout.split(b"-----END CERTIFICATE-----\n")[:-1]
    assert len(certs) == 3 and certs[2] + b"-----END CERTIFICATE-----\n" == root_pem
    leaf = certs[0] + b"-----END CERTIFICATE-----\n"
    verified = openssl_verify(
        tmp_path, root_pem, leaf, sub.stdout.split(b"-----END CERTIFICATE-----\n")[0] + b"-----END CERTIFICATE-----\n"
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


# ------------------------------------------------------------------ the class: random fault schedules
ROUTES = [
    ("POST", CREATE),
    ("POST", MERGE),
    ("GET", PENDING),
    ("GET", r"^/certificates/root/$"),
    ("GET", r"^/certificates/root/versions$"),
    ("PATCH", VERSION),
]
KINDS = [
    ("status", 503),
    ("status", 500),
    ("status", 429),
    ("drop", 503),
    ("apply-then-status", 504),
    ("apply-then-status", 502),
    ("apply-then-drop", 503),
]
SCHEDULES = int(os.environ.get("KVPKI_FUZZ_CASES_AZURE_INIT", "8"))


@pytest.mark.parametrize("seed", range(SCHEDULES))
def test_random_fault_schedule_never_deletes_and_one_rerun_finishes(
    az: Kvpki, kv: KeyVaultTestServer, make_csr: Any, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    rules = []
    for method, path in rng.sample(ROUTES, k=rng.randint(1, 3)):
        kind, status = rng.choice(KINDS)
        count = rng.choice([1, 2, 3, None])
        rules.append(
            FaultRule(kind=kind, status=status, method=method, path_regex=path, count=count, skip=rng.randint(0, 1))
        )
    kv.set_faults(rules=rules)
    first = init(az, kv)
    kv.set_faults()
    assert "Traceback" not in first.stderr.decode()
    assert first.returncode in (0, 6), (rules, first.stderr)
    assert_nothing_deleted(kv)
    done = first
    if first.returncode != 0:
        one_error_line(first)
        done = init(az, kv)
        assert done.returncode == 0, (rules, first.stderr, done.stderr)
    warned = b"could not disable the temporary version" in done.stderr  # a warning, the CA is complete
    assert_ca_works(az, kv, done.stdout, make_csr, tmp_path, temporary_disabled=not warned)
