"""The committed stubs must be what the one generator makes from the committed .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "the generator wrote nothing"
    stale = [str(p) for p in fresh if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"stale stubs, run `python -m protos.generate`: {stale}"


def test_stubs_import_without_colliding_with_the_fusionrec_package() -> None:
    from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc

    assert ranker_pb2.DESCRIPTOR.package == "fusionrec.v1"
    assert hasattr(ranker_pb2_grpc, "RankerStub")
