"""Export and tracing: ONNX (run in onnxruntime), torch.jit.trace and torch.export.export.

ONNX export and torch.jit.trace run a fastrnn module as the torch.nn module it replaces (``fastrnn.interop``), so
the file or graph must be torch.nn's, node for node, and compute what the fastrnn module computes.
torch.export.export keeps fastrnn's custom ops.
"""

import collections

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from conftest import TOL
from rnn_cases import CELLS, KINDS, _flat, every_backend, twins

# the `test` extra's (README); a machine without it skips this module, saying which is missing, rather than fail
# the collection of every test beside it
onnx = pytest.importorskip("onnx", reason="the `test` extra's onnx is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the `test` extra's onnxruntime is not installed")

# torch's own notices, about its deprecated tools and torch.nn's code, which is what runs under them
pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}") for m in (
    r".*torch\.jit\.(trace|script).* is deprecated:FutureWarning",
    "Exporting a model while it is in training mode",
    "_check_is_size will be removed:FutureWarning",
    "You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "The feature will be removed:DeprecationWarning",
    "Converting a tensor to a Python:torch.jit.TracerWarning",
    r"The tensor attributes self\.module\._flat_weights",
    "Exporting a model to ONNX with a batch_size other than 1",
    "No names were found for specified dynamic axes",
)]
FP32 = TOL[torch.float32]
RNN_OPTIONS = {
    "L2-bidir-hx": dict(num_layers=2, bidirectional=True),
    "batch_first-nobias": dict(batch_first=True, bias=False),
}
ONNX_KINDS = [k for k in KINDS if k != "lstm_proj"]


class WithState(nn.Module):
    """``module(x, hx)`` with the LSTM state as two inputs (exporters take tensors, not tuples)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, *hx):
        return self.module(x, hx if len(hx) == 2 else hx[0])


def _state(module, batch):
    """Random initial states as a tuple of tensors, for ``WithState``."""
    if isinstance(module, nn.RNNBase):
        shape = ((2 if module.bidirectional else 1) * module.num_layers, batch, module.hidden_size)
    else:
        shape = (batch, module.hidden_size)
    return tuple(torch.randn(shape) for _ in range(2 if module._get_name().startswith("LSTM") else 1))


def _export(model, args, path, **kwargs):
    """Export with torch.onnx.export; the ONNX op types it wrote and an onnxruntime session on the file."""
    model.eval()
    program = torch.onnx.export(model, args, path, **kwargs)
    if program is not None:
        program.save(path)
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    return ops, onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _run(session, args):
    return [torch.from_numpy(o) for o in session.run(None, {i.name: a.numpy() for i, a in
                                                             zip(session.get_inputs(), args)})]


def _assert_runs_like(session, model, args):
    got, want = _run(session, args), _flat(model(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), **FP32)


def _cases():
    out = [pytest.param(kind, opts, id=f"{kind}-{name}") for kind in ONNX_KINDS for name, opts in RNN_OPTIONS.items()]
    return out + [pytest.param(kind, {}, id=kind) for kind in CELLS]


@pytest.mark.parametrize("kind, opts", _cases())
def test_onnx_export_is_torch_nn_export_and_runs_in_onnxruntime(kind, opts, tmp_path):
    """The default exporter writes the nodes it writes for torch.nn (one ONNX LSTM/GRU node per layer, both
    directions in it), and onnxruntime reproduces the fastrnn module with the initial states as inputs."""
    ref, fast = twins(kind, 3, 4, torch.float32, "auto", **opts)
    shape = ((2, 5, 3) if opts.get("batch_first") else (5, 2, 3)) if kind in KINDS else (2, 3)
    args = (torch.randn(shape), *_state(ref, 2))
    ops, session = _export(WithState(fast), args, str(tmp_path / "fast.onnx"))
    torch_ops, _ = _export(WithState(ref), args, str(tmp_path / "torch.onnx"))
    assert ops == torch_ops
    if kind in ("lstm", "gru"):
        assert ops[kind.upper()] == ref.num_layers
    _assert_runs_like(session, WithState(fast), args)


def _dynamic_dims(path: str) -> list:
    """For each graph input, which dimensions the ONNX file leaves symbolic."""
    return [[bool(d.dim_param) for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]


def test_onnx_dynamic_batch_and_time(tmp_path):
    fast = fastrnn.LSTM(3, 4, num_layers=2, batch_first=True)
    ref = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    kw = dict(dynamic_shapes=({0: batch, 1: time},))
    _, session = _export(fast, (torch.randn(2, 5, 3),), str(tmp_path / "m.onnx"), **kw)
    if not _dynamic_dims(str(tmp_path / "m.onnx"))[0][:2] == [True, True]:
        # fastrnn exports as torch.nn's module: where torch.nn's own file loses the axes, the exporter does
        _export(ref, (torch.randn(2, 5, 3),), str(tmp_path / "torch.onnx"), **kw)
        if _dynamic_dims(str(tmp_path / "torch.onnx"))[0][:2] != [True, True]:
            pytest.skip(f"torch {torch.__version__}'s ONNX exporter writes fixed batch/time axes for torch.nn.LSTM "
                        "itself (dynamic_shapes lost)")
    _assert_runs_like(session, fast, (torch.randn(3, 8, 3),))


class Padded(nn.Module):
    """Variable-length sequences as padded input and lengths, packed around the recurrent module."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        out, hx = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out, total_length=x.shape[0])[0], hx


@pytest.mark.parametrize("kind", ONNX_KINDS)
def test_onnx_variable_lengths_with_the_torchscript_exporter(kind, tmp_path):
    """Packed sequences export as torch.nn's do: with ``dynamo=False`` (torch's default exporter cannot
    trace packing, for torch.nn either) as ONNX nodes taking ``sequence_lens``."""
    ref, fast = twins(kind, 3, 4, torch.float32, "auto", bidirectional=True)
    model, path = Padded(fast), str(tmp_path / "m.onnx")
    args = (torch.randn(6, 3, 3), torch.tensor([6, 2, 4]))
    kw = dict(dynamo=False, input_names=["x", "lengths"], dynamic_axes={"x": [0, 1], "lengths": [0]})
    ops, session = _export(model, args, path, **kw)
    assert ops == _export(Padded(ref), args, str(tmp_path / "torch.onnx"), **kw)[0]
    recurrent = [n for n in onnx.load(path).graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert recurrent and all(len(n.input) > 4 and n.input[4] for n in recurrent)  # input 4: sequence_lens
    _assert_runs_like(session, model, (torch.randn(7, 4, 3), torch.tensor([3, 7, 1, 5])))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_refuses_proj_size_naming_it(dynamo, tmp_path):
    """ONNX's LSTM has no projection; torch.nn.LSTM(proj_size=...) writes a file onnxruntime rejects."""
    with pytest.raises(Exception, match=r"proj_size=2\) cannot be exported to ONNX"):
        torch.onnx.export(fastrnn.LSTM(3, 4, proj_size=2).eval(), (torch.randn(5, 2, 3),),
                          str(tmp_path / "m.onnx"), dynamo=dynamo)


OWN_CELLS = [("layer_norm", True, False), ("zoneout", 0.1, False), ("recurrent_dropout", 0.2, True)]


@pytest.mark.parametrize("option, value, train", OWN_CELLS, ids=[o for o, _, _ in OWN_CELLS])
@pytest.mark.parametrize("tool", ["onnx", "trace"])
def test_fastrnn_own_cells_fail_naming_the_option(tool, option, value, train, tmp_path):
    """fastrnn's own cells have no torch.nn equivalent: export and tracing name the option and torch.export
    (recurrent dropout only in training: it does nothing in eval, where torch.nn's module is the same)."""
    fast = fastrnn.GRU(3, 4, **{option: value}).train(train)
    x = torch.randn(5, 2, 3)
    with pytest.raises(Exception, match=rf"{option}={value!r}\) has no torch.nn equivalent.*torch.export.export"):
        if tool == "onnx":
            torch.onnx.export(fast, (x,), str(tmp_path / "m.onnx"))
        else:
            torch.jit.trace(fast, (x,))


def test_recurrent_dropout_exports_in_eval(tmp_path):
    fast = fastrnn.GRU(3, 4, recurrent_dropout=0.2).eval()
    x = torch.randn(5, 2, 3)
    _assert_runs_like(_export(fast, (x,), str(tmp_path / "m.onnx"))[1], fast, (x,))


def test_torch_jit_script_fails_naming_the_ways():
    model = nn.Sequential(fastrnn.LSTM(3, 4))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile fastrnn.LSTM: torch.jit.trace .*"
                                           "torch.onnx.export and torch.export.export"):
        torch.jit.script(model)
    assert type(model[0]) is fastrnn.LSTM


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_relu", *CELLS])
def test_jit_trace_gives_torch_nn_trace(kind):
    """torch.jit.trace records torch.nn's ops (aten::lstm & co.), node for node, and the traced module computes
    what the fastrnn module computes on a new input."""
    ref, fast = twins(kind, 3, 4, torch.float32, "auto", **({"bidirectional": True} if kind in KINDS else {}))
    shape = (5, 2, 3) if kind in KINDS else (2, 3)
    traced = torch.jit.trace(fast, (torch.randn(shape),))
    want = torch.jit.trace(ref, (torch.randn(shape),))
    assert [n.kind() for n in traced.graph.nodes()] == [n.kind() for n in want.graph.nodes()]
    x = torch.randn(shape)
    for g, w in zip(_flat(traced(x)), _flat(fast(x)), strict=True):
        torch.testing.assert_close(g, w, **FP32)


@pytest.mark.parametrize("backend_dtype", every_backend())
def test_torch_export_keeps_fastrnn_ops(backend_dtype):
    """torch.export.export (not ONNX) records the backend's custom op (or the reference's aten ops) and the
    exported program computes what the module computes."""
    backend, dtype = backend_dtype
    fast = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=dtype, backend=backend).eval()
    x = torch.randn(5, 2, 3, dtype=dtype)
    program = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # the cpp backend runs a bidirectional layer's two directions as one pair op
    layer_op = {"cpp": "fastrnn.layer_pair_fwd.default", "triton": "fastrnn.triton_layer_fwd.default"}.get(backend)
    assert (layer_op in targets) if layer_op else not any(t.startswith("fastrnn.") for t in targets), targets
    assert not any("lstm" in t for t in targets), targets
    x = torch.randn(5, 2, 3, dtype=dtype)
    for g, w in zip(_flat(program.module()(x)), _flat(fast(x)), strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("kind", ["lstm", "gru"])
    def test_onnx_export_of_a_cuda_module(kind, tmp_path):
        """A module on the GPU exports as its torch.nn twin does; onnxruntime (CPU) reproduces its outputs."""
        _, fast = twins(kind, 3, 4, torch.float32, "auto", num_layers=2)
        fast = fast.cuda()
        x = torch.randn(5, 2, 3)
        _, session = _export(fast, (x.cuda(),), str(tmp_path / "m.onnx"))
        got = _run(session, (x,))
        want = [w.detach().cpu() for w in _flat(fast(x.cuda()))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32)
