"""The backend interface: both backends implement it, and a new one plugs in as a module."""

from __future__ import annotations

import textwrap

import pytest

import edge_ds
from edge_ds import backends
from edge_ds.backend import Backend
from edge_ds.errors import OptionError
from edge_ds.resources import default_model_path


def test_registry_lists_the_backend_modules():
    assert {"mlx", "onnx"} <= set(backends.names())


@pytest.mark.parametrize("name", ["mlx", "onnx"])
def test_shipped_backends_implement_the_protocol(name):
    lm = edge_ds.load(backend=name)  # the shipped model carries both
    assert isinstance(lm.backend, Backend) and lm.backend.name == name
    assert lm.experts is None and lm.new_cache().offset == 0


def test_a_new_backend_is_one_module(tmp_path, monkeypatch):
    """A module dropped into the backends package is found by name and runs generation, the
    API's streaming and the stats through the interface alone."""
    (tmp_path / "echo.py").write_text(textwrap.dedent('''
        from edge_ds.backends import mlx

        class Echo:
            name = "echo"
            experts = None

            def __init__(self, inner):
                self.inner, self.config, self.device = inner, inner.config, "the mlx backend, renamed"
                self.calls = 0

            def __call__(self, tokens, cache=None):
                self.calls += 1
                return self.inner(tokens, cache)

            def make_cache(self):
                return self.inner.make_cache()

            def reset_peak_memory(self):
                pass

            def peak_memory_bytes(self):
                return 123

        def detect(directory):
            return False

        def load(directory, experts=None):
            return Echo(mlx.load(directory))
    '''))
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    assert "echo" in backends.names()
    lm = edge_ds.load(backend="echo")
    ref = edge_ds.load(backend="mlx").generate("In the beginning", max_tokens=8)
    out = lm.generate("In the beginning", max_tokens=8)
    assert isinstance(lm.backend, Backend) and lm.backend.calls > 0
    assert out.tokens == ref.tokens and out.stats.peak_memory_gb == 123 / 1e9


def test_unknown_backend_names_the_argument():
    with pytest.raises(OptionError, match="backend 'tpu' is not available") as e:
        backends.open_backend("tpu", default_model_path())
    assert e.value.option == "backend"
