"""The committed stubs in client/pb/ import, come from the pinned generator, and match proto/."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.pb import draftfeed_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("draftfeed_proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _committed() -> dict[str, str]:
    return {name: (gen.OUT_DIR / name).read_text() for name in gen.STUBS}


def _embedded_descriptor(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source)
    assert match, "no serialized descriptor found in draftfeed_pb2.py"
    fdp = descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(match.group(1)))

    def clear_json_names(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            clear_json_names(message.nested_type)

    clear_json_names(fdp.message_type)
    return fdp


_STUB_METHOD = re.compile(
    r"self\.(\w+) = channel\.(\w+)\(\s*'([^']+)',\s*request_serializer=\w+\.(\w+)\.SerializeToString,"
    r"\s*response_deserializer=\w+\.(\w+)\.FromString"
)
_SERVICER_METHOD = re.compile(r"def (\w+)\(self, (request|request_iterator), context\)")
_PYI_CLASS = re.compile(r"^\s*class (\w+)\(_message\.Message\)", re.M)
_PYI_FIELD = re.compile(r"^\s*(\w+_FIELD_NUMBER): _ClassVar\[int\]", re.M)


def _differences(fresh: dict[str, str], committed: dict[str, str]) -> list[str]:
    """What differs in content between two sets of stubs, ignoring generator-version details."""
    out = []
    if _embedded_descriptor(fresh["draftfeed_pb2.py"]) != _embedded_descriptor(committed["draftfeed_pb2.py"]):
        out.append("draftfeed_pb2.py: the embedded descriptor differs from the .proto")
    for name, patterns in (
        ("draftfeed_pb2_grpc.py", (_STUB_METHOD, _SERVICER_METHOD)),
        ("draftfeed_pb2.pyi", (_PYI_CLASS, _PYI_FIELD)),
    ):
        for pattern in patterns:
            a, b = pattern.findall(fresh[name]), pattern.findall(committed[name])
            if a != b:
                out.append(f"{name}: {sorted(set(a) ^ set(b))[:5]} differ")
    return out


def test_stubs_import_and_name_their_package():
    assert pb_grpc.draftfeed_dot_v1_dot_draftfeed__pb2 is pb
    assert pb.ReplyFrame.__module__ == "draftfeed.client.pb.draftfeed_pb2"
    assert pb.DESCRIPTOR.name == "draftfeed/v1/draftfeed.proto"
    assert pb.DESCRIPTOR.package == "draftfeed.v1"
    service = pb.DESCRIPTOR.services_by_name["TargetService"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert kinds == {
        "GetModelInfo": (False, False),
        "OpenSession": (False, False),
        "SetVocabMapping": (False, False),
        "CloseSession": (False, False),
        "Generate": (False, True),
        "GenerateStream": (True, True),
        "StreamWeights": (False, True),
        "GetTokenizer": (False, False),
    }
    stub = pb_grpc.TargetServiceStub(grpc.insecure_channel("127.0.0.1:1"))
    assert isinstance(stub.GenerateStream, grpc.StreamStreamMultiCallable)


def test_stubs_come_from_the_pinned_generator():
    """Stubs from a newer grpcio-tools refuse to import under older grpcio (the GPU machine runs 1.84)."""
    assert f"GRPC_GENERATED_VERSION = '{gen.PINNED_GRPCIO_TOOLS}'" in _committed()["draftfeed_pb2_grpc.py"]
    # the pin must not be newer than the oldest grpcio pyproject allows
    pyproject = (ROOT / "pyproject.toml").read_text()
    oldest = re.search(r'"grpcio>=([\d.]+)', pyproject).group(1)
    assert tuple(map(int, gen.PINNED_GRPCIO_TOOLS.split("."))) <= tuple(
        map(int, (oldest + ".0").split(".")[:3])
    )


def _needs_protoc():
    return pytest.importorskip(
        "grpc_tools.protoc", reason="grpcio-tools is not installed (pip install '.[test]')"
    )


def test_committed_stubs_match_the_proto():
    _needs_protoc()
    fresh, committed = gen.generate(), _committed()
    if importlib.metadata.version("grpcio-tools") == gen.PINNED_GRPCIO_TOOLS:
        stale = [name for name in gen.STUBS if fresh[name] != committed[name]]
    else:  # another generator version: compare content, not its version headers
        stale = _differences(fresh, committed)
    assert not stale, f"stubs are stale ({stale}); regenerate with proto/generate.py (see its docstring)"


def test_a_changed_proto_is_detected(tmp_path, monkeypatch):
    """The comparison above fails for real staleness: a new field, and a new RPC."""
    _needs_protoc()
    committed = _committed()
    source = (gen.PROTO_ROOT / gen.PROTO_FILE).read_text()
    edits = [
        source.replace(
            "  string server_version = 12;\n", "  string server_version = 12;\n  uint32 extra = 9999;\n"
        ),
        source.replace(
            "  rpc CloseSession(", "  rpc Ping(GetModelInfoRequest) returns (ModelInfo);\n  rpc CloseSession("
        ),
    ]
    for edited in edits:
        assert edited != source
        root = tmp_path / "proto"
        shutil.rmtree(root, ignore_errors=True)
        (root / gen.PROTO_FILE).parent.mkdir(parents=True)
        (root / gen.PROTO_FILE).write_text(edited)
        monkeypatch.setattr(gen, "PROTO_ROOT", root)
        assert _differences(gen.generate(), committed)
