"""TLS on the gRPC port, end to end with grpcio (and with our client library): certificates made
at test time by trustme, server side from NIMBUS_TLS_* settings."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trustme

from nimbus.config import ConfigError
from tests.harness import doorman_settings
from tests.test_auth import SECRET, bearer, grpcio_stream
from tests.test_interop_grpcio import stubs  # noqa: F401 (fixture)
from tests.test_pipeline import cluster


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return {"tls_cert_file": str(chain), "tls_key_file": str(key), "ca": str(ca_file)}


def creds(ca: trustme.CA, client_cert: Any = None) -> Any:
    import grpc

    if client_cert is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client_cert.private_key_pem.bytes(),
        certificate_chain=b"".join(p.bytes() for p in client_cert.cert_chain_pems),
    )


async def test_grpcio_over_tls(
    ca: trustme.CA, server_files: dict[str, str], unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    files = {k: v for k, v in server_files.items() if k != "ca"}
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, **files) as c:
            port = c.ports[0]
            code, details, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port,
                    [("client_id", f"tls-{unique}")],
                    stubs,
                    [1, 2, 3],
                    3,
                    credentials=creds(ca),
                )
            )
            assert code == "OK" and [r.result for r in got] == [1, 4, 9], (code, details)
            # A client that does not trust our CA cannot connect; nor can a plaintext one.
            other = trustme.CA()
            code, _, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port,
                    [("client_id", f"tls-{unique}")],
                    stubs,
                    [1],
                    1,
                    credentials=creds(other),
                    timeout=5,
                )
            )
            assert code == "UNAVAILABLE" and got == []
            code, _, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port, [("client_id", f"tls-{unique}")], stubs, [1], 1, timeout=5
                )
            )
            assert code == "UNAVAILABLE" and got == []


async def test_mutual_tls_requires_a_client_certificate(
    ca: trustme.CA, server_files: dict[str, str], unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    files = {
        "tls_cert_file": server_files["tls_cert_file"],
        "tls_key_file": server_files["tls_key_file"],
        "tls_client_ca_file": server_files["ca"],
    }
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, auth="jwt", auth_secret=SECRET, **files) as c:
            port = c.ports[0]
            cid = f"mtls-{unique}"
            from nimbus.doorman.auth import issue

            tok = issue(cid, ttl_sec=60, key=SECRET)
            client_cert = ca.issue_cert(f"{cid}@clients.example")
            code, details, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port, [bearer(tok)], stubs, [5], 1, credentials=creds(ca, client_cert)
                )
            )
            assert code == "OK" and [r.result for r in got] == [25], (code, details)
            # Without a client certificate the handshake fails.
            code, _, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port, [bearer(tok)], stubs, [5], 1, credentials=creds(ca), timeout=5
                )
            )
            assert code == "UNAVAILABLE" and got == []
            # A certificate from another CA is refused too.
            stranger = trustme.CA().issue_cert("stranger@clients.example")
            code, _, got = await trio.to_thread.run_sync(
                lambda: grpcio_stream(
                    port, [bearer(tok)], stubs, [5], 1, credentials=creds(ca, stranger), timeout=5
                )
            )
            assert code == "UNAVAILABLE" and got == []


async def test_library_client_over_tls(
    ca: trustme.CA, server_files: dict[str, str], unique: str
) -> None:
    import ssl

    from nimbus.client import open_client

    files = {k: v for k, v in server_files.items() if k != "ca"}
    ctx = ssl.create_default_context(cafile=server_files["ca"])
    ctx.set_alpn_protocols(["h2"])
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, **files) as c:
            async with open_client(
                [f"127.0.0.1:{c.ports[0]}"], f"lib-tls-{unique}", ssl=ctx
            ) as client:
                await client.send("sq", 12)
                r = await client.receive()
                assert r.result == 144


def test_tls_settings_are_checked_at_start(server_files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set both or neither"):
        doorman_settings(env={"NIMBUS_TLS_CERT_FILE": server_files["tls_cert_file"]}, dotenv=False)
    with pytest.raises(ConfigError, match="needs NIMBUS_TLS_CERT_FILE"):
        doorman_settings(env={"NIMBUS_TLS_CLIENT_CA_FILE": server_files["ca"]}, dotenv=False)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load certificate"):
        doorman_settings(
            env={
                "NIMBUS_TLS_CERT_FILE": str(bad),
                "NIMBUS_TLS_KEY_FILE": server_files["tls_key_file"],
            },
            dotenv=False,
        )
    s = doorman_settings(
        env={
            "NIMBUS_TLS_CERT_FILE": server_files["tls_cert_file"],
            "NIMBUS_TLS_KEY_FILE": server_files["tls_key_file"],
        },
        dotenv=False,
    )
    assert s.tls_cert_file == server_files["tls_cert_file"]
