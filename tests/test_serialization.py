"""torch.save of a whole model holding fastrnn modules, loaded with ``torch.load(..., weights_only=True)``: the
allow-list torch.nn's version of the model needs plus ``fastrnn.SAFE_GLOBALS`` is enough."""

import importlib

import pytest
import torch
from torch import nn

import fastrnn
from rnn_cases import CELLS, KINDS, _flat

ALL = {**KINDS, **CELLS}


def _model(make):
    """A ModuleDict with one module of every kind, built by ``make(torch.nn class, kwargs)``."""
    return nn.ModuleDict({kind: make(cls, dict(extra, **({"num_layers": 2, "bidirectional": True}
                                                          if kind in KINDS else {})))
                          for kind, (cls, extra) in ALL.items()})


def _globals_needed(path):
    """The classes a weights_only load of ``path`` must have allowed, as objects."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [getattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in names]


@pytest.fixture
def torch_model_and_allow_list(tmp_path):
    model = _model(lambda cls, kw: cls(3, 4, **kw))
    torch.save(model, tmp_path / "torch.pt")
    return model, _globals_needed(tmp_path / "torch.pt")


def _assert_same_outputs(loaded, model):
    for kind, module in model.items():
        x = torch.randn((5, 2, 3) if kind in KINDS else (2, 3))
        for g, w in zip(_flat(loaded[kind](x)), _flat(module(x)), strict=True):
            assert torch.equal(g, w), kind


def test_whole_model_needs_only_fastrnn_classes_on_top(torch_model_and_allow_list, tmp_path):
    _, allowed = torch_model_and_allow_list
    model = _model(lambda cls, kw: getattr(fastrnn, cls.__name__)(3, 4, backend="cpp",
                                                                   backend_options={"cpp": {}}, **kw))
    torch.save(model, tmp_path / "fast.pt")
    with torch.serialization.safe_globals(allowed), pytest.raises(Exception, match=r"GLOBAL fastrnn\.modules\."):
        torch.load(tmp_path / "fast.pt", weights_only=True)
    with torch.serialization.safe_globals(allowed + fastrnn.SAFE_GLOBALS):
        loaded = torch.load(tmp_path / "fast.pt", weights_only=True)
    assert [type(m) for m in loaded.values()] == [type(m) for m in model.values()]
    assert all(m.backend == "cpp" and m.backend_options == {"cpp": {}} for m in loaded.values())
    _assert_same_outputs(loaded, model)


def test_patched_model_loads_with_the_same_allow_list(torch_model_and_allow_list, tmp_path):
    """A patched model also holds the torch.nn modules it replaced (for unpatch): allowed already."""
    model, allowed = torch_model_and_allow_list
    fastrnn.patch(model)
    torch.save(model, tmp_path / "patched.pt")
    with torch.serialization.safe_globals(allowed + fastrnn.SAFE_GLOBALS):
        loaded = torch.load(tmp_path / "patched.pt", weights_only=True)
    _assert_same_outputs(loaded, model)
    fastrnn.unpatch(loaded)
    assert [type(m) for m in loaded.values()] == [cls for cls, _ in ALL.values()]
