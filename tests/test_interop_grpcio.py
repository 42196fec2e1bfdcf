"""Interop: Google's grpcio, an independent gRPC implementation, as the client of our grpclib
server. Stubs are generated from protocols/nimbus.proto at test time, exactly as a user of the
original would generate theirs."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio_asyncio

from tests.harness import open_cluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    out = tmp_path_factory.mktemp("grpcio_stubs")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protocols'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "protocols" / "nimbus.proto"),
        ],
        check=True,
    )
    sys.path.insert(0, str(out))
    try:
        # A private module name: nimbus_pb2 also exists inside our package.
        pb2 = importlib.import_module("nimbus_pb2")
        grpc_mod = importlib.import_module("nimbus_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, grpc_mod


def _run_client(
    port: int, client_id: str, numbers: list[int], stubs: tuple[ModuleType, ModuleType]
) -> list[tuple[int, int]] | tuple[str, str]:
    import grpc

    pb2, grpc_mod = stubs
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = grpc_mod.NimbusServiceStub(ch)

        def requests():  # type: ignore[no-untyped-def]
            for n in numbers:
                yield pb2.EventRequest(event_name="sq", number=n)
            time.sleep(30)  # keep the request side open, as the original client does

        call = stub.ProcessEvent(requests(), metadata=(("client_id", client_id),), timeout=30)
        out = []
        try:
            for r in call:
                out.append((r.number, r.result))
                if len(out) == len(numbers):
                    call.cancel()
                    break
        except grpc.RpcError as e:
            return (e.code().name, e.details())
        return out


async def test_grpcio_client_gets_results_in_order(stubs: tuple[ModuleType, ModuleType]) -> None:
    with trio.fail_after(60):
        async with trio_asyncio.open_loop(), open_cluster(pods=1) as c:
            got = await trio.to_thread.run_sync(
                _run_client, c.ports[0], "grpcio-1", list(range(1, 21)), stubs
            )
            assert got == [(n, n * n) for n in range(1, 21)]


async def test_grpcio_missing_client_id_is_invalid_argument(
    stubs: tuple[ModuleType, ModuleType],
) -> None:
    with trio.fail_after(60):
        async with trio_asyncio.open_loop(), open_cluster(pods=1) as c:
            got = await trio.to_thread.run_sync(_run_client, c.ports[0], "", [1], stubs)
            assert got == ("INVALID_ARGUMENT", "client_id not received or empty in metadata")


async def test_grpcio_health_and_reflection(stubs: tuple[ModuleType, ModuleType]) -> None:
    def check(port: int) -> tuple[bytes, list[str]]:
        import grpc

        # grpclib's copies of the health and reflection messages (grpcio's own would clash in
        # the descriptor pool with the ones the server registered in this process).
        from grpclib.reflection.v1alpha import reflection_pb2 as refl

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            check_call = ch.unary_unary(
                "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
            )
            status = check_call(b"", timeout=10)
            info = ch.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=refl.ServerReflectionRequest.SerializeToString,
                response_deserializer=refl.ServerReflectionResponse.FromString,
            )
            resp = next(
                iter(info(iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
            )
            return status, [s.name for s in resp.list_services_response.service]

    with trio.fail_after(60):
        async with trio_asyncio.open_loop(), open_cluster(pods=1) as c:
            status, services = await trio.to_thread.run_sync(check, c.ports[0])
            assert status == b"\x08\x01"  # HealthCheckResponse{status: SERVING}
            assert "nimbus.NimbusService" in services
