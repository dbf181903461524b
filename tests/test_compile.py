"""torch.compile traces fastrnn modules with zero graph breaks and gives eager's numbers."""

import pytest
import torch
import torch._dynamo

import fastrnn
from conftest import TOL, usable_backends

MODULES = {
    "lstm_proj_bidir": lambda b: fastrnn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True, backend=b),
    "gru_batch_first": lambda b: fastrnn.GRU(3, 5, batch_first=True, backend=b),
    "rnn_relu": lambda b: fastrnn.RNN(3, 5, nonlinearity="relu", backend=b),
    "lstm_cell": lambda b: fastrnn.LSTMCell(3, 5, backend=b),
    "gru_cell": lambda b: fastrnn.GRUCell(3, 5, backend=b),
    "rnn_cell": lambda b: fastrnn.RNNCell(3, 5, backend=b),
}


class Model(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(5 if not getattr(rnn, "bidirectional", False) else 4, 2)

    def forward(self, x):
        out = self.rnn(x)
        first = out[0] if isinstance(out, tuple) else out
        return self.head(first).sum()


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("name", MODULES)
def test_compile_zero_graph_breaks_same_result(name, backend):
    torch._dynamo.reset()
    model = Model(MODULES[name](backend)).double()
    is_cell = "cell" in name
    x = torch.randn((4, 3) if is_cell else (4, 2, 3), dtype=torch.float64, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager, **TOL[torch.float64])
    torch.testing.assert_close(g_comp, g_eager, **TOL[torch.float64])


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("name", MODULES)
def test_compiled_autograd_runs_an_eager_graphs_backward(name, backend):
    """Compiled autograd over the backward of a graph built in eager mode (on the cpp backend, its C++ autograd
    nodes, which it calls as they are): every gradient equals eager autograd's."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    model = Model(MODULES[name](backend)).double()
    x = torch.randn((4, 3) if "cell" in name else (4, 2, 3), dtype=torch.float64, requires_grad=True)
    params = [x, *model.parameters()]
    want = torch.autograd.grad(model(x), params)
    loss = model(x)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, **TOL[torch.float64])
