"""Resume reuses a folder's records only when this machine and this code wrote them (bench/launch/campaign.py):
the code is the bench package's digest, not the git commit."""

from __future__ import annotations

import pytest

from bench.launch.campaign import refuse_foreign_records
from bench.machine import envinfo
from bench.records import RunRecord
from bench.spec.schema import MatrixError


def _record(**env) -> RunRecord:
    return RunRecord(matrix="m", cell_id="c", label="c", repeat=0, settings={}, status="ok", started_at=1.0,
                     wall_s=1.0, env={**envinfo.fingerprint(), **env})


def test_a_commit_that_left_the_code_alone_resumes(tmp_path):
    refuse_foreign_records([_record(git_sha="0" * 40)], tmp_path)  # README-only commit since: same digest


def test_other_code_under_the_same_commit_is_refused(tmp_path):
    # two different uncommitted edits of one commit both read "<sha>-dirty": the digest tells them apart
    with pytest.raises(MatrixError, match="the hardware or the code differs"):
        refuse_foreign_records([_record(code_digest="0123456789abcdef")], tmp_path)


def test_other_hardware_is_refused_whatever_the_code(tmp_path):
    with pytest.raises(MatrixError, match="8x NVIDIA H200 at git"):
        refuse_foreign_records([_record(hardware="8x NVIDIA H200")], tmp_path)


def test_records_from_before_the_digest_match_by_commit(tmp_path):
    old = _record()
    old.env.pop("code_digest")
    refuse_foreign_records([old], tmp_path)  # same commit
    old.env["git_sha"] = "0" * 40
    with pytest.raises(MatrixError, match="at git 0000"):
        refuse_foreign_records([old], tmp_path)


def test_the_digest_follows_the_package_content(tmp_path, monkeypatch):
    package = tmp_path / "bench"
    (package / "machine").mkdir(parents=True)
    (package / "machine" / "envinfo.py").write_text("# stand-in path: the digest walks this file's package\n")
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(envinfo, "__file__", str(package / "machine" / "envinfo.py"))
    envinfo.code_digest.cache_clear()
    first = envinfo.code_digest()
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"bytecode")
    envinfo.code_digest.cache_clear()
    assert envinfo.code_digest() == first  # bytecode is not code
    (package / "a.py").write_text("x = 2\n")
    envinfo.code_digest.cache_clear()
    assert envinfo.code_digest() != first
    envinfo.code_digest.cache_clear()
