"""Token-bound identity (nimbus.doorman.auth): the verifier's rules as unit tests, then the doorman with
NIMBUS_AUTH=jwt end to end, statuses asserted with grpcio (an independent gRPC client).

The end-to-end test is the issue's "done when": with auth on, a stream using another client's
id, a forged or an expired token is refused before anything changes state, and one client
cannot receive another's results."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from nimbus import config
from nimbus.config import ConfigError
from nimbus.core.lifecycle import Status
from nimbus.doorman import auth
from nimbus.doorman.auth import AuthError, Verifier, issue
from nimbus.proto_gen.nimbus import ResponseKind
from tests.harness import doorman_settings
from tests.test_interop_grpcio import stubs  # noqa: F401 (fixture)
from tests.test_pipeline import P2, cluster, engine, wait_status  # noqa: F401 (fixture)
from tests.wire import open_stream

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
OTHER_SECRET = "another-secret-the-server-does-not-know-0123456789"


def hs(**kw: Any) -> Verifier:
    return Verifier(("HS256",), secret=SECRET, **kw)


def keypair(kind: str) -> tuple[bytes, Any]:
    """(private PEM, public key object)."""
    key: Any = (
        rsa.generate_private_key(65537, 2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key.public_key()


def refused(v: Verifier, md: dict[str, str]) -> AuthError:
    with pytest.raises(AuthError) as e:
        v.identify(md)
    return e.value


# --- the verifier ----------------------------------------------------------------------------


def test_valid_token_gives_its_subject_as_the_client_id() -> None:
    tok = issue("alice", ttl_sec=60, key=SECRET)
    assert hs().identify({"authorization": f"Bearer {tok}"}) == "alice"
    assert hs().identify({"authorization": f"bearer {tok}", "client_id": "alice"}) == "alice"


def test_missing_malformed_expired_forged_tokens_are_unauthenticated() -> None:
    v = hs()
    cases = {
        "no metadata": {},
        "empty": {"authorization": ""},
        "not bearer": {"authorization": f"Basic {issue('alice', ttl_sec=60, key=SECRET)}"},
        "bearer without token": {"authorization": "Bearer "},
        "garbage": {"authorization": "Bearer not.a.jwt"},
        "expired": {
            "authorization": f"Bearer {issue('alice', ttl_sec=60, key=SECRET, now=time.time() - 3600)}"
        },
        "forged": {"authorization": f"Bearer {issue('alice', ttl_sec=60, key=OTHER_SECRET)}"},
        "alg none": {
            "authorization": "Bearer "
            + jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
        },
        "no exp": {
            "authorization": "Bearer " + jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
        },
        "no sub": {
            "authorization": "Bearer "
            + jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        },
        "not yet valid": {
            "authorization": "Bearer "
            + jwt.encode(
                {"sub": "alice", "exp": int(time.time()) + 600, "nbf": int(time.time()) + 300},
                SECRET,
                algorithm="HS256",
            )
        },
    }
    for name, md in cases.items():
        err = refused(v, md)
        assert err.status == "UNAUTHENTICATED", name
    assert refused(v, cases["expired"]).message == "token expired"
    assert refused(v, cases["forged"]).message == "bad token signature"


def test_a_valid_token_for_another_client_is_permission_denied() -> None:
    tok = issue("bob", ttl_sec=60, key=SECRET)
    err = refused(hs(), {"authorization": f"Bearer {tok}", "client_id": "alice"})
    assert err.status == "PERMISSION_DENIED"


def test_leeway_accepts_a_token_just_expired() -> None:
    tok = issue("alice", ttl_sec=60, key=SECRET, now=time.time() - 62)
    assert hs(leeway_sec=30).identify({"authorization": f"Bearer {tok}"}) == "alice"
    assert refused(hs(), {"authorization": f"Bearer {tok}"}).message == "token expired"


def test_issuer_and_audience_are_checked_when_configured() -> None:
    v = hs(issuer="https://idp", audience="nimbus")
    good = issue("alice", ttl_sec=60, key=SECRET, issuer="https://idp", audience="nimbus")
    assert v.identify({"authorization": f"Bearer {good}"}) == "alice"
    for bad in (
        issue("alice", ttl_sec=60, key=SECRET),
        issue("alice", ttl_sec=60, key=SECRET, issuer="https://evil", audience="nimbus"),
        issue("alice", ttl_sec=60, key=SECRET, issuer="https://idp", audience="other"),
    ):
        assert refused(v, {"authorization": f"Bearer {bad}"}).status == "UNAUTHENTICATED"


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256")])
def test_public_key_algorithms(kind: str, alg: str) -> None:
    private, public = keypair(kind)
    v = Verifier((alg,), public_key=public)
    tok = issue("alice", ttl_sec=60, algorithm=alg, key=private)
    assert v.identify({"authorization": f"Bearer {tok}"}) == "alice"
    other_private, _ = keypair(kind)
    forged = issue("alice", ttl_sec=60, algorithm=alg, key=other_private)
    assert refused(v, {"authorization": f"Bearer {forged}"}).status == "UNAUTHENTICATED"
    # An HS256 token is not accepted by a server configured for public keys only.
    hs_tok = issue("alice", ttl_sec=60, key=SECRET)
    assert "not accepted" in refused(v, {"authorization": f"Bearer {hs_tok}"}).message


def test_the_public_key_is_never_used_as_an_hmac_secret() -> None:
    """Algorithm confusion: an HS256 token 'signed' with the server's public key PEM."""
    private, public = keypair("rsa")
    pub_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    v = Verifier(("HS256", "RS256"), secret=SECRET, public_key=public)
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(f'{{"sub":"alice","exp":{int(time.time()) + 60}}}'.encode())
    import hashlib
    import hmac

    sig = jwt.utils.base64url_encode(
        hmac.new(pub_pem, header + b"." + body, hashlib.sha256).digest()
    )
    forged = (header + b"." + body + b"." + sig).decode()
    assert refused(v, {"authorization": f"Bearer {forged}"}).status == "UNAUTHENTICATED"
    assert (
        v.identify(
            {
                "authorization": f"Bearer {issue('alice', ttl_sec=60, algorithm='RS256', key=private)}"
            }
        )
        == "alice"
    )


def test_config_refuses_auth_without_keys_and_loads_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a secret"):
        doorman_settings(env={"NIMBUS_AUTH": "jwt"}, dotenv=False)
    with pytest.raises(ConfigError, match="needs a public key"):
        doorman_settings(
            env={"NIMBUS_AUTH": "jwt", "NIMBUS_AUTH_ALGORITHMS": "ES256"}, dotenv=False
        )
    with pytest.raises(ConfigError, match="NIMBUS_AUTH_ALGORITHMS"):
        doorman_settings(env={"NIMBUS_AUTH_ALGORITHMS": "none"}, dotenv=False)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="cannot read"):
        doorman_settings(
            env={
                "NIMBUS_AUTH": "jwt",
                "NIMBUS_AUTH_ALGORITHMS": "RS256",
                "NIMBUS_AUTH_PUBLIC_KEY_FILE": str(missing),
            },
            dotenv=False,
        )
    _, public = keypair("ec")
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    s = doorman_settings(
        env={
            "NIMBUS_AUTH": "jwt",
            "NIMBUS_AUTH_ALGORITHMS": "es256",
            "NIMBUS_AUTH_PUBLIC_KEY_FILE": str(pub),
        },
        dotenv=False,
    )
    v = Verifier.from_settings(s)
    assert v is not None and v.algorithms == ("ES256",)
    assert Verifier.from_settings(config.load(env={}, dotenv=False)) is None


def test_token_command_issues_tokens_the_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nimbus.doorman import token

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("NIMBUS_AUTH_SECRET", SECRET)
    assert token.main(["--client-id", "alice", "--ttl", "3600"]) == 0
    tok = capsys.readouterr().out.strip()
    assert hs().identify({"authorization": f"Bearer {tok}"}) == "alice"
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert 3590 <= claims["exp"] - time.time() <= 3600

    private, public = keypair("ec")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(private)
    assert (
        token.main(
            ["--client-id", "bob", "--algorithm", "ES256", "--private-key-file", str(key_file)]
        )
        == 0
    )
    tok = capsys.readouterr().out.strip()
    assert (
        Verifier(("ES256",), public_key=public).identify({"authorization": f"Bearer {tok}"})
        == "bob"
    )

    monkeypatch.delenv("NIMBUS_AUTH_SECRET")
    with pytest.raises(SystemExit) as e:
        token.main(["--client-id", "alice"])
    assert e.value.code == 2


def test_auth_module_constants() -> None:
    assert auth.parse_algorithms(" hs256 , RS256,HS256") == ("HS256", "RS256")


# --- end to end ------------------------------------------------------------------------------


def grpcio_stream(
    port: int,
    metadata: list[tuple[str, str]],
    stub_mods: tuple[ModuleType, ModuleType],
    numbers: list[int],
    want: int,
    *,
    credentials: Any = None,
    timeout: float = 20,
) -> tuple[str, str, list[Any]]:
    """Open a ProcessEvent stream with grpcio, send `numbers` (protocol 2 if asked in metadata),
    read until `want` results; returns (status code name, details, results)."""
    import threading

    import grpc

    pb2, grpc_mod = stub_mods
    target = f"127.0.0.1:{port}"
    ch = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    done = threading.Event()
    with ch:
        stub = grpc_mod.NimbusServiceStub(ch)

        def requests():  # type: ignore[no-untyped-def]
            for i, n in enumerate(numbers, 1):
                yield pb2.EventRequest(event_name="sq", number=n, seq=i)
            done.wait(timeout)

        call = stub.ProcessEvent(requests(), metadata=metadata, timeout=timeout)
        got: list[Any] = []
        try:
            for r in call:
                if r.kind == pb2.RESULT:
                    got.append(r)
                    if len(got) >= want:
                        call.cancel()
                        break
        except grpc.RpcError as e:
            done.set()
            return e.code().name, e.details() or "", got
        finally:
            done.set()
        return "OK", "", got


def bearer(tok: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {tok}")


async def test_one_client_cannot_receive_anothers_results(
    engine: dict[str, Any], unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    alice, bob = f"alice-{unique}", f"bob-{unique}"
    tok_alice = issue(alice, ttl_sec=600, key=SECRET)
    tok_bob = issue(bob, ttl_sec=600, key=SECRET)
    with trio.fail_after(120):
        async with cluster(engine, auth="jwt", auth_secret=SECRET) as c:
            port = c.ports[0]
            # Alice sends 1..20, has them receipted (durable), leaves without reading results:
            # they are her backlog.
            async with open_stream(
                port, {"authorization": f"Bearer {tok_alice}", "client_id": alice, **P2}
            ) as st:
                for n in range(1, 21):
                    await st.event("sq", n, seq=n)
                last_id = receipts = 0
                while receipts < 20:
                    r = await st.recv()
                    assert r is not None
                    if r.kind == ResponseKind.RECEIPT:
                        receipts += 1
                        last_id = max(last_id, r.delivery_id)
            await wait_status(c, alice, Status.OFFLINE)
            # Her record settles once all 20 results are in the DLQ (routing goes on after she
            # left); only then is it a fair "before".
            while True:
                before = await c.engine.state.get(alice)
                if before is not None and before.dlq_written >= last_id:
                    break
                await trio.sleep(0.05)
            produced = sum((await c.engine.log.end_offsets(c.settings.kafka_events_topic)).values())

            p2 = ("nimbus-protocol", "2")
            attempts = {
                "no token": ([("client_id", alice), p2], "UNAUTHENTICATED"),
                "bob's token, alice's id": (
                    [bearer(tok_bob), ("client_id", alice), p2],
                    "PERMISSION_DENIED",
                ),
                "forged": (
                    [bearer(issue(alice, ttl_sec=600, key=OTHER_SECRET)), ("client_id", alice), p2],
                    "UNAUTHENTICATED",
                ),
                "forged, no client_id": (
                    [bearer(issue(alice, ttl_sec=600, key=OTHER_SECRET)), p2],
                    "UNAUTHENTICATED",
                ),
                "expired": (
                    [
                        bearer(issue(alice, ttl_sec=60, key=SECRET, now=time.time() - 3600)),
                        ("client_id", alice),
                        p2,
                    ],
                    "UNAUTHENTICATED",
                ),
                "unsigned": (
                    [
                        bearer(
                            jwt.encode(
                                {"sub": alice, "exp": int(time.time()) + 60}, None, algorithm="none"
                            )
                        ),
                        p2,
                    ],
                    "UNAUTHENTICATED",
                ),
            }
            for name, (md, want) in attempts.items():
                code, details, got = await trio.to_thread.run_sync(
                    grpcio_stream, port, md, stubs, [7], 1
                )
                assert (code, got) == (want, []), (name, code, details)
            # Nothing changed state: no connect (same epoch, still OFFLINE, no kick), nothing produced.
            assert await c.engine.state.get(alice) == before
            assert (
                sum((await c.engine.log.end_offsets(c.settings.kafka_events_topic)).values())
                == produced
            )

            # Bob, with his own valid token, gets his own result and nothing of Alice's.
            code, details, got = await trio.to_thread.run_sync(
                grpcio_stream, port, [bearer(tok_bob), p2], stubs, [1000], 1
            )
            assert code == "OK" and [(r.number, r.result) for r in got] == [(1000, 1_000_000)], (
                code,
                details,
            )

            # Alice comes back (her token alone identifies her) and gets all 20, in order.
            async with open_stream(port, {"authorization": f"Bearer {tok_alice}", **P2}) as st:
                got_alice = await st.results(20)
            assert [r.number for r in got_alice] == list(range(1, 21))
            assert [r.result for r in got_alice] == [n * n for n in range(1, 21)]


async def test_auth_off_the_original_client_still_works_and_tokens_are_ignored(
    unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            code, _, got = await trio.to_thread.run_sync(
                grpcio_stream, c.ports[0], [("client_id", f"orig-{unique}")], stubs, [1, 2, 3], 3
            )
            assert code == "OK" and [r.result for r in got] == [1, 4, 9]
            code, details, _ = await trio.to_thread.run_sync(
                grpcio_stream, c.ports[0], [bearer("whatever")], stubs, [1], 1
            )
            assert (code, details) == (
                "INVALID_ARGUMENT",
                "client_id not received or empty in metadata",
            )


async def test_library_client_sends_its_token(unique: str) -> None:
    import trio_asyncio

    from nimbus.client import StreamRefused, open_client

    cid = f"lib-{unique}"
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, auth="jwt", auth_secret=SECRET) as c:
            target = f"127.0.0.1:{c.ports[0]}"
            async with open_client(
                [target], cid, token=issue(cid, ttl_sec=60, key=SECRET)
            ) as client:
                for n in (3, 4):
                    await client.send("sq", n)
                got = [await client.receive() for _ in range(2)]
                assert [r.result for r in got] == [9, 16]
            with pytest.raises(BaseException) as e:
                async with open_client(
                    [target], cid, token=issue(cid, ttl_sec=60, key=OTHER_SECRET), connect_timeout=5
                ) as client:
                    await client.send("sq", 1)
                    await client.receive()
            leaf = e.value
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, StreamRefused) and "UNAUTHENTICATED" in str(leaf), repr(e.value)
            assert trio_asyncio  # the cluster runs inside its loop


def test_exposure_warnings_at_start() -> None:
    from nimbus.doorman.server import exposure_warnings, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.com")
    local = config.load(env={"NIMBUS_HOST": "127.0.0.1"}, dotenv=False)
    assert exposure_warnings(local) == []
    exposed = config.load(env={"NIMBUS_HOST": "0.0.0.0"}, dotenv=False)
    [auth_warning, tls_warning] = exposure_warnings(exposed)
    assert "auth is off" in auth_warning and "0.0.0.0" in auth_warning
    assert "TLS is off" in tls_warning
    with_auth = config.load(
        env={"NIMBUS_HOST": "0.0.0.0", "NIMBUS_AUTH": "jwt", "NIMBUS_AUTH_SECRET": SECRET},
        dotenv=False,
    )
    [tls_only] = exposure_warnings(with_auth)
    assert "tokens travel in clear text" in tls_only


async def test_the_server_logs_the_warning_when_it_starts_exposed(unique: str) -> None:
    """The warning reaches the log at start (the server binds loopback here, and is told it
    listens on all interfaces only through the check's input)."""
    import trio_asyncio
    from loguru import logger

    from nimbus.doorman import server

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        real = server.exposure_warnings
        server.exposure_warnings = lambda s: real(
            config.load(env={"NIMBUS_HOST": "0.0.0.0"}, dotenv=False)
        )  # type: ignore[assignment]
        try:
            with trio.fail_after(30):
                async with cluster({"engine": "memory"}):
                    pass
        finally:
            server.exposure_warnings = real
    finally:
        logger.remove(sink)
    assert any("auth is off and the server listens on 0.0.0.0" in line for line in lines), lines
    assert trio_asyncio


@settings(max_examples=300, deadline=None)
@given(
    header=st.one_of(
        st.text(max_size=300), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
    ),
    client_id=st.text(max_size=20),
)
def test_any_authorization_value_is_refused_cleanly(header: str, client_id: str) -> None:
    """Whatever a client puts in the metadata, the verifier answers with AuthError (a status),
    never with another exception that would reach grpclib as an internal error."""
    for value in (header, f"Bearer {header}", "Bearer " + header.replace(" ", ".")):
        with pytest.raises(AuthError):
            hs().identify({"authorization": value, "client_id": client_id})


# --- short secrets and claims that are not numbers (issue #14) -------------------------------


def test_an_hmac_secret_shorter_than_its_hash_refuses_to_start() -> None:
    """RFC 7518 3.2: HS256 needs a 32-byte key, HS384 48, HS512 64. PyJWT only warns."""
    with pytest.raises(ValueError, match="NIMBUS_AUTH_SECRET is 31 bytes; HS256 needs at least 32"):
        Verifier(("HS256",), secret="x" * 31)
    assert Verifier(("HS256",), secret="x" * 32).algorithms == ("HS256",)
    with pytest.raises(ValueError, match="HS512 needs at least 64"):
        Verifier(("HS256", "HS512"), secret="x" * 48)
    with pytest.raises(ConfigError, match="NIMBUS_AUTH_SECRET is 6 bytes.*openssl rand -hex 32"):
        doorman_settings(
            env={"NIMBUS_AUTH": "jwt", "NIMBUS_AUTH_SECRET": "secret"},
            dotenv=False,
        )
    # Auth off: the secret is not used, so not checked.
    assert config.load(env={"NIMBUS_AUTH_SECRET": "secret"}, dotenv=False).auth == "off"


def test_the_token_command_refuses_a_short_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nimbus.doorman import token

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("NIMBUS_AUTH_SECRET", "short")
    with pytest.raises(SystemExit) as e:
        token.main(["--client-id", "alice"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 bytes; HS256 needs at least 32" in err, err
    with pytest.raises(SystemExit):
        token.main(["--client-id", "alice", "--algorithm", "HS384", "--secret", "y" * 40])
    assert "HS384 needs at least 48" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", str(int(time.time()) + 3600)),  # PyJWT takes a numeric string as a date
        ("exp", "9999999999"),
        ("nbf", "0"),
        ("iat", "0"),
    ],
)
def test_a_date_claim_that_is_not_a_number_is_unauthenticated(claim: str, value: Any) -> None:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "exp": now + 3600, "iat": now, claim: value}
    tok = jwt.encode(claims, SECRET, algorithm="HS256")
    err = refused(hs(), {"authorization": f"Bearer {tok}"})
    assert err.status == "UNAUTHENTICATED"
    # Numbers, integral or not (RFC 7519 NumericDate), are still accepted.
    good = jwt.encode({**claims, claim: now + 3600.5 if claim == "exp" else now}, SECRET, "HS256")
    assert hs().identify({"authorization": f"Bearer {good}"}) == "alice"
