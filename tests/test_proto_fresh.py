"""The committed generated code must be what scripts/gen_proto.sh makes from protocols/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# A fresh machine's PATH: the system's tools only, not the project's .venv/bin (where the
# betterproto plugin is). gen_proto.sh must find what it needs by itself.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "proto_gen"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable, "PATH": SYSTEM_PATH},
    )
    committed = ROOT / "nimbus" / "proto_gen"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*.py"))
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*.py"))
    stale = [str(p) for p in fresh if (out / p).read_text() != (committed / p).read_text()]
    assert not stale, f"nimbus/proto_gen is stale ({stale}); run `make proto` and commit"


def test_a_failed_generation_leaves_the_tree_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "proto_gen"
    out.mkdir()
    (out / "keep.py").write_text("kept = True\n")
    # A Python without the betterproto plugin beside it: the script must fail, and touch nothing.
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "/usr/bin/python3", "PATH": SYSTEM_PATH},
    )
    assert proc.returncode != 0
    assert "protoc-gen-python_betterproto not found" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.py"]


def test_wire_compatible_with_the_original() -> None:
    """The original's messages keep their field numbers and types."""
    from nimbus.proto_gen import nimbus_pb2 as pb

    def fields(msg: str) -> dict[str, tuple[int, int]]:
        d = pb.DESCRIPTOR.message_types_by_name[msg]
        return {f.name: (f.number, f.type) for f in d.fields}

    req, resp = fields("EventRequest"), fields("EventResponse")
    assert req["event_name"][0] == 1 and req["number"] == (2, 5)  # int32
    assert resp["event_name"][0] == 1 and resp["number"] == (2, 5) and resp["result"] == (3, 5)
    assert resp["log"][0] == 4
    assert all(
        n >= 10
        for name, (n, _) in {**req, **resp}.items()
        if name not in ("event_name", "number", "result", "log")
    )
    svc = pb.DESCRIPTOR.services_by_name["NimbusService"].methods_by_name["ProcessEvent"]
    assert svc.client_streaming and svc.server_streaming
