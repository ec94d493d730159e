"""Backend choice: argument > use_backend > FASTLAYERS_BACKEND > automatic."""
import pytest
import torch

import fastlayers
from fastlayers import _backend


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    assert _backend.choose("op", torch.device("cpu"), cuda_op="x") == "reference"


def test_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTLAYERS_BACKEND", "triton")
    assert _backend.choose("op", cpu) == "triton"  # interpreter is on in the tests
    with fastlayers.use_backend("reference"):
        assert _backend.choose("op", cpu) == "reference"
        assert _backend.choose("op", cpu, backend="triton") == "triton"
    assert _backend.choose("op", cpu) == "triton"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "auto")
    assert _backend.choose("op", cpu) == "reference"


def test_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="FASTLAYERS_BACKEND"):
        monkeypatch.setenv("FASTLAYERS_BACKEND", "fast")
        _backend.choose("op", torch.device("cpu"))
    monkeypatch.delenv("FASTLAYERS_BACKEND")
    with pytest.raises(ValueError, match="use_backend"):
        with fastlayers.use_backend("nope"):
            pass
    with pytest.raises(TypeError):
        _backend.choose("op", torch.device("cpu"), backend=3)


def test_triton_without_interpreter_needs_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.choose("op", torch.device("cpu"), backend="triton")


def test_unsupported_case(monkeypatch):
    with pytest.raises(NotImplementedError, match="does not support"):
        _backend.choose("op", torch.device("cpu"), backend="triton", triton_ok="odd layout")
    with pytest.raises(NotImplementedError, match="no CUDA kernel"):
        _backend.choose("op", torch.device("cuda"), backend="cuda", cuda_op=None)


def test_float64_goes_to_reference():
    assert _backend.choose("op", torch.device("cpu"), dtype=torch.float64) == "reference"
