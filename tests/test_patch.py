"""patch/unpatch and from_torch on a real small model: same losses and gradients, weights shared."""

import pytest
import torch
from torch import nn

import fastrnn
from conftest import TOL, usable_backends


class CharModel(nn.Module):
    def __init__(self, vocab=11, emb=6, hidden=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.GRUCell(hidden, hidden), nn.Linear(hidden, vocab))
        self.extra = nn.ModuleDict({"rnn": nn.RNN(emb, hidden, nonlinearity="relu"), "cell": nn.LSTMCell(emb, hidden)})

    def forward(self, tokens):
        e = self.emb(tokens)
        out, _ = self.rnn(e)
        r, _ = self.extra["rnn"](e.transpose(0, 1))
        h, c = self.extra["cell"](e[:, -1])
        last = self.head[0](out[:, -1] + r[-1] + h + c)
        return self.head[1](last)


def _loss_and_grads(model, tokens, target):
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(tokens), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", usable_backends())
def test_patch_gives_identical_losses_and_grads_and_unpatch_restores(backend):
    model = CharModel().double()
    tokens = torch.randint(0, 11, (3, 7))
    target = torch.randint(0, 11, (3,))
    loss0, grads0 = _loss_and_grads(model, tokens, target)
    originals = {n: m for n, m in model.named_modules()}
    params_before = {n: p for n, p in model.named_parameters()}

    replaced = fastrnn.patch(model, backend=backend)
    assert set(replaced) == {"rnn", "head.0", "extra.rnn", "extra.cell"}
    assert type(model.rnn) is fastrnn.LSTM and type(model.head[0]) is fastrnn.GRUCell
    assert type(model.extra["rnn"]) is fastrnn.RNN and model.extra["rnn"].nonlinearity == "relu"
    assert all(p is params_before[n] for n, p in model.named_parameters()), "patch must keep the same Parameters"
    assert model.rnn.batch_first and model.rnn.num_layers == 2

    loss1, grads1 = _loss_and_grads(model, tokens, target)
    torch.testing.assert_close(loss1, loss0, **TOL[torch.float64])
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], **TOL[torch.float64])

    restored = fastrnn.unpatch(model)
    assert set(restored) == set(replaced)
    for n, m in model.named_modules():
        assert m is originals[n]
    loss2, _ = _loss_and_grads(model, tokens, target)
    torch.testing.assert_close(loss2, loss0, **TOL[torch.float64])


def test_patch_keeps_training_mode_dtype_and_rejects_bare_rnn():
    model = nn.Sequential(nn.GRU(3, 4), nn.Identity()).to(torch.float64).eval()
    fastrnn.patch(model)
    assert not model[0].training and model[0].weight_hh_l0.dtype == torch.float64
    with pytest.raises(TypeError, match="pass the parent model"):
        fastrnn.patch(nn.LSTM(3, 4))


def test_from_torch_shares_parameters_and_checks_type():
    ref = nn.LSTM(3, 5, proj_size=2, bidirectional=True)
    fast = fastrnn.LSTM.from_torch(ref, backend="reference")
    assert repr(fast) == repr(ref) and fast.weight_hr_l0_reverse is ref.weight_hr_l0_reverse
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL[torch.float32])
    with pytest.raises(TypeError, match="from_torch expects"):
        fastrnn.GRU.from_torch(ref)
    with pytest.raises(TypeError, match="from_torch expects a torch.nn.GRUCell"):
        fastrnn.GRUCell.from_torch(nn.LSTMCell(3, 4))


def test_backend_selection_precedence(monkeypatch):
    from fastrnn import backend

    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    assert backend.requested_backend() == "reference"
    with fastrnn.use_backend("cpp"):
        assert backend.requested_backend() == "cpp"
        with fastrnn.use_backend("reference"):
            assert backend.requested_backend() == "reference"
        assert backend.requested_backend() == "cpp"
    fastrnn.set_backend("triton")
    try:
        assert backend.requested_backend() == "triton"
    finally:
        fastrnn.set_backend(None)
    monkeypatch.setenv("FASTRNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND must be"):
        backend.requested_backend()


def test_unavailable_backend_error_lists_every_backend():
    from fastrnn import backend

    with pytest.raises(RuntimeError) as info:
        backend.resolve("cpp", torch.device("meta"), torch.int64)
    msg = str(info.value)
    for name in backend.BACKENDS:
        assert f"  {name}: " in msg
