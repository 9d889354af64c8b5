"""bench.machine.bytecode: a library without cached bytecode, under PYTHONDONTWRITEBYTECODE, is reported with its fix."""
import subprocess
import sys

import pytest

from bench.machine import bytecode, envinfo

SAMPLE = {"bench_bytecode_probe": "heavy.py"}


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """A real installed-looking package with source only (no __pycache__), importable from tmp_path."""
    package = tmp_path / "bench_bytecode_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "heavy.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_source_only_library_is_reported_uncached(probe_package):
    state = bytecode.cache_state(SAMPLE)
    assert state["uncached"] == {"bench_bytecode_probe": str(probe_package)}


def test_warning_names_the_library_and_the_command_that_fixes_it(probe_package, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    warning = bytecode.recompile_warning(bytecode.cache_state(SAMPLE))
    assert warning is not None
    assert "bench_bytecode_probe" in warning and "PYTHONDONTWRITEBYTECODE" in warning
    command = warning.split("Compile it once: ", 1)[1].split()
    assert command[1:3] == ["-m", "compileall"] and command[-1] == str(probe_package.parent)
    # The command it names does fix it.
    subprocess.run(command, check=True)
    assert bytecode.cache_state(SAMPLE)["uncached"] == {}
    assert bytecode.recompile_warning(bytecode.cache_state(SAMPLE)) is None


def test_no_warning_when_ranks_will_write_the_cache(probe_package, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    state = bytecode.cache_state(SAMPLE)
    assert state["uncached"] and state["writes_bytecode"]
    assert bytecode.recompile_warning(state) is None


def test_missing_library_is_not_reported():
    assert bytecode.cache_state({"no_such_library_here": "x.py"})["uncached"] == {}


def test_every_record_keeps_the_state():
    state = envinfo.fingerprint()["bytecode_cache"]
    assert set(state) == {"writes_bytecode", "uncached"}
