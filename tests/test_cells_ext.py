"""fastrnn's own cells (LayerNorm, zoneout, recurrent dropout) against a plain PyTorch loop of their equations.

The loop below is written from the equations in the module docstrings and shares no code with fastrnn. The
masks a module draws are recorded as it draws them and handed to the loop, so training mode is checked
exactly, draw for draw.
"""

import contextlib
import copy
import itertools
from typing import Dict, List, Optional

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from conftest import TOL, TOL_LAYER_NORM, assert_close, tolerance_used, usable_backends
from fastrnn import backend as _backend

KINDS = {"LSTM": ("LSTM", {}), "GRU": ("GRU", {}), "RNN_TANH": ("RNN", {}),
         "RNN_RELU": ("RNN", {"nonlinearity": "relu"})}
FEATURES = {"ln": dict(layer_norm=True), "zo": dict(zoneout=0.3), "rd": dict(recurrent_dropout=0.4),
            "ln-zo-rd": dict(layer_norm=True, zoneout=0.25, recurrent_dropout=0.3)}
# An fp32 result off the fp64 truth by more than the table passes if the draw is that sensitive: within
# FP32_NUDGED times the farthest FP32_NUDGES fp64 runs move, each with its inputs and parameters moved by one
# fp32 rounding. About one LSTM LayerNorm draw in a thousand needs it (4000 seeds, 2 layers, bidirectional;
# GRU and RNN none). Of the 33 draws there within a quarter of the table, the cpp kernels' error was at most 2.0
# times the farthest of 8 such moves (2.8 of 4). Of 400 draws, half moved the truth by under 1/60 of the table
# (at their worst tensor) and nine in ten by under 1/15: on those the rule loosens nothing.
FP32_NUDGES, FP32_NUDGED = 8, 4.0


def ext_backends(dtype=torch.float32) -> List[str]:
    """The backends that run fastrnn's cells here with ``dtype`` storage; Triton under its interpreter (fp32,
    not fp64, which it lacks)."""
    names = usable_backends(dtype=dtype) + ["triton"]
    return [b for b in names if _backend.reason_unavailable(b, torch.device("cpu"), dtype) is None
            and "layer_norm" in getattr(_backend._module(b), "EXT_FEATURES", ())]


def skip_unless_runs(backend: str, dtype) -> None:
    """Skip a case for a dtype the backend does not store (Triton: fp64)."""
    reason = _backend.reason_unavailable(backend, torch.device("cpu"), dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def layer_norm(v: Tensor, w: Tensor, b: Tensor) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5) * w + b


def loop_layer(mode: str, x: Tensor, lengths: Tensor, h0: Tensor, c0: Optional[Tensor], p: Dict[str, Tensor],
               reverse: bool, zh: Optional[Tensor], zc: Optional[Tensor], rm: Optional[Tensor]):
    """One layer and direction over time-major ``x: [T, B, I]``; sequence ``b`` runs its first ``lengths[b]``
    steps (in reverse it starts from ``h0`` at its own last step); padding outputs are 0."""
    T = x.shape[0]
    h, c = h0, c0
    ys: List[Optional[Tensor]] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gx = x[t] @ p["w_ih"].T
        gh = (h if rm is None else h * rm) @ p["w_hh"].T
        if "ln_ih_w" in p:
            gx, gh = layer_norm(gx, p["ln_ih_w"], p["ln_ih_b"]), layer_norm(gh, p["ln_hh_w"], p["ln_hh_b"])
        if "b_ih" in p:
            gx, gh = gx + p["b_ih"], gh + p["b_hh"]
        c_new = None
        if mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_in = layer_norm(c_new, p["ln_c_w"], p["ln_c_b"]) if "ln_c_w" in p else c_new
            h_new = torch.sigmoid(o) * torch.tanh(c_in)
            if "w_hr" in p:
                h_new = h_new @ p["w_hr"].T
        elif mode == "GRU":
            (xr, xz, xn), (hr, hz, hn) = gx.chunk(3, 1), gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
        else:
            h_new = torch.tanh(gx + gh) if mode == "RNN_TANH" else torch.relu(gx + gh)
        if zh is not None:
            h_new = zh[t] * h + (1 - zh[t]) * h_new
            if c is not None:
                c_new = zc[t] * c + (1 - zc[t]) * c_new
        active = (lengths > t).unsqueeze(1)
        h = torch.where(active, h_new, h)
        if c is not None:
            c = torch.where(active, c_new, c)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def layer_params(m, sfx: str) -> Dict[str, Tensor]:
    """The loop's names for the parameters of one layer and direction (``sfx`` "_l0_reverse"; "" for a cell)."""
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr",
             "ln_ih_w": "layer_norm_ih_weight", "ln_ih_b": "layer_norm_ih_bias", "ln_hh_w": "layer_norm_hh_weight",
             "ln_hh_b": "layer_norm_hh_bias", "ln_c_w": "layer_norm_c_weight", "ln_c_b": "layer_norm_c_bias"}
    found = {k: getattr(m, n + sfx, None) for k, n in names.items()}
    return {k: v for k, v in found.items() if v is not None}


def rows_to_steps(mask: Optional[Tensor], batch_sizes: Optional[Tensor], T: int, B: int) -> Optional[Tensor]:
    """A per-row mask (fastrnn's time-major row layout, dense or packed) as ``[T, B, width]``."""
    if mask is None or batch_sizes is None:
        return None if mask is None else mask.reshape(T, B, -1)
    out = mask.new_zeros(T, B, mask.shape[1])  # padding: never read by the loop (inactive rows keep state)
    off = 0
    for t, b in enumerate(batch_sizes.tolist()):
        out[t, :b] = mask[off:off + b]
        off += b
    return out


class MaskRecorder:
    """Records every mask a module draws, in drawing order (layer by layer, direction by direction)."""


    def __init__(self, m):
        self.m, self.masks, self.named = m, [], []

    def of(self, name: str) -> List[Optional[Tensor]]:
        return [mask for n, mask in self.named if n == name]

    def _wrap(self, name):
        original = getattr(self.m, name)

        def record(*args):
            mask = original(*args)
            if mask is not None:
                self.masks.append(mask)
                self.named.append((name, mask))
            return mask

        return record

    @contextlib.contextmanager
    def __call__(self):
        for name in ("_zoneout_mask", "_recurrent_dropout_mask"):
            setattr(self.m, name, self._wrap(name))
        try:
            yield self
        finally:
            for name in ("_zoneout_mask", "_recurrent_dropout_mask"):
                delattr(self.m, name)


def loop_module(m, x: Tensor, lengths: Tensor, h0: Tensor, c0: Optional[Tensor], masks: List[Optional[Tensor]],
                batch_sizes: Optional[Tensor]):
    """The whole module over time-major ``x: [T, B, I]`` in the layer's batch order."""
    T, B = x.shape[:2]
    D = 2 if m.bidirectional else 1
    masks = list(masks)
    hs, cs = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            zh = zc = None
            if m.zoneout:
                zh = rows_to_steps(masks.pop(0), batch_sizes, T, B)
                if m.mode == "LSTM":
                    zc = rows_to_steps(masks.pop(0), batch_sizes, T, B)
            rm = masks.pop(0) if m.recurrent_dropout and m.training else None
            y, h, c = loop_layer(m.mode, x, lengths, h0[k], None if c0 is None else c0[k], layer_params(m, f"_l{layer}" + ("_reverse" if d else "")),
                                 d == 1, zh, zc, rm)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        x = torch.cat(outs, 2)
    assert not masks, "the module drew masks the loop did not use"
    return x, torch.stack(hs), (torch.stack(cs) if c0 is not None else None)


def make_module(kind: str, features: dict, dtype, backend: str, I=3, H=8, **kw):
    cls, extra = KINDS[kind]
    return perturb_layer_norm(getattr(fastrnn, cls)(I, H, dtype=dtype, backend=backend, **extra, **features, **kw))


def perturb_layer_norm(m):
    """LayerNorm gains and shifts moved off their initial 1 and 0, so that a mix-up of the two shows."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


def check_module(m, form: str, dtype, T=6, B=4, device="cpu") -> None:
    """Outputs, states and every gradient of ``m`` (on ``device``) against ``loop_module`` with ``m``'s own draws,
    the loop on the CPU in fp64."""
    H, Hout = m.hidden_size, m.proj_size or m.hidden_size
    L = m.num_layers * (2 if m.bidirectional else 1)
    lengths = torch.full((B,), T) if form != "packed" else torch.randint(1, T + 1, (B,))
    if form == "packed":
        lengths[0] = T
    x_tm = torch.randn(T, B, m.input_size, dtype=dtype, device=device, requires_grad=True)
    h0 = torch.randn(L, B, Hout, dtype=dtype, device=device, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=dtype, device=device, requires_grad=True) if m.mode == "LSTM" else None
    hx = (h0, c0) if c0 is not None else h0

    with MaskRecorder(m)() as rec:
        batch_sizes = order = None
        if form == "packed":
            packed = pack_padded_sequence(x_tm, lengths, enforce_sorted=False)
            out, hn = m(packed, hx)
            y = pad_packed_sequence(out, total_length=T)[0]
            batch_sizes, order = packed.batch_sizes, packed.sorted_indices.cpu()
        elif form == "unbatched":
            out, hn = m(x_tm[:, 0], tuple(s[:, 0] for s in hx) if c0 is not None else h0[:, 0])
            y = out.unsqueeze(1)
            hn = tuple(s.unsqueeze(1) for s in hn) if c0 is not None else hn.unsqueeze(1)
        elif form == "batch_first":
            out, hn = m(x_tm.transpose(0, 1), hx)
            y = out.transpose(0, 1)
        else:
            out, hn = m(x_tm, hx)
            y = out
    h_n, c_n = hn if c0 is not None else (hn, None)
    outs = [y, h_n] + ([c_n] if c0 is not None else [])

    names = ["y", "h_n", "c_n"][:len(outs)]
    grad_names = ["x", "h0"] + (["c0"] if c0 is not None else []) + [n for n, _ in m.named_parameters()]
    weights = [torch.randn_like(o, dtype=torch.float64) for o in outs]

    def loop_run(mod, dt, nudge=0.0):
        """The loop on ``dt`` copies of the inputs and ``mod``'s parameters, each element of them first moved by
        ``nudge`` of itself up or down at random: outputs, then gradients."""
        def nudged(v):
            return v if not nudge else v * (1 + nudge * (2 * torch.randint(0, 2, v.shape, dtype=v.dtype) - 1))
        with torch.no_grad():
            for q in mod.parameters():
                q.copy_(nudged(q))
        xs = [None if t is None else nudged(t.detach().cpu().to(dt)).requires_grad_() for t in (x_tm, h0, c0)]
        sel = order if order is not None else torch.arange(y.shape[1])
        res = loop_module(mod, xs[0][:, sel], lengths[sel], xs[1][:, sel], None if c0 is None else xs[2][:, sel],
                          [mk.cpu().to(dt) for mk in rec.masks], batch_sizes)
        back = torch.argsort(sel)
        res = [r[:, back] for r in res if r is not None]
        ins = [t for t in xs if t is not None] + list(mod.parameters())
        return res, torch.autograd.grad(sum((r * w.cpu().to(dt)).sum() for r, w in zip(res, weights)), ins)

    got_grads = torch.autograd.grad(sum((o * w.to(dtype)).sum() for o, w in zip(outs, weights)),
                                    [t for t in (x_tm, h0, c0) if t is not None] + list(m.parameters()))
    # fp64, the truth every dtype is measured against: fp32 is not compared with an fp32 loop, whose own
    # rounding through LayerNorm's division by the row's deviation would count twice
    truth = loop_run(copy.deepcopy(m).double().cpu(), torch.float64)
    table = TOL_LAYER_NORM if m.layer_norm else TOL
    nudged_truths = []  # run only where an fp32 comparison fails
    for i, (got, want) in enumerate(((outs, truth[0]), (got_grads, truth[1]))):
        for k, (label, g, w) in enumerate(zip(names if i == 0 else ["d" + n for n in grad_names], got, want)):
            assert g.shape == w.shape, (label, g.shape, w.shape)
            try:
                assert_close(g, w.to(g.dtype), label, table)
            except AssertionError:
                if dtype != torch.float32 or not torch.isfinite(w).all():
                    raise
                # A rare draw amplifies rounding past the table, whoever computes it in fp32. The draw's own
                # sensitivity says so: the fp64 loop again with every input and parameter moved by one fp32
                # rounding. fp32 passes within FP32_NUDGED times the farthest that moves the truth.
                if not nudged_truths:
                    nudged_truths = [loop_run(copy.deepcopy(m).double().cpu(), torch.float64, 2.0 ** -24)
                                     for _ in range(FP32_NUDGES)]
                used = tolerance_used(g, w, table, torch.float32)
                moved = max(tolerance_used(n[i][k], w, table, torch.float32) for n in nudged_truths)
                if not used <= max(1.0, FP32_NUDGED * moved) < float("inf"):
                    raise AssertionError(f"{label}: {used:.3g} of the fp32 tolerance; inputs moved by one fp32 "
                                         f"rounding move the fp64 truth by {moved:.3g} of it") from None


MODULE_CASES = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=1, batch_first=True),
]


def _case_id(kw):
    return "-".join(f"{k}{v}" if not isinstance(v, bool) else (k if v else f"no{k}") for k, v in kw.items())


@pytest.mark.parametrize("backend", ext_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("opts", MODULE_CASES, ids=_case_id)
@pytest.mark.parametrize("kind", KINDS)
def test_module_matches_loop(kind, opts, features, train, dtype, backend):
    skip_unless_runs(backend, dtype)
    m = make_module(kind, FEATURES[features], dtype, backend, **opts).train(train)
    check_module(m, "batch_first" if opts.get("batch_first") else "batched", dtype)


# On a GPU (collected only where one is present): the cpp backend's CUDA kernels (per-step, or the persistent
# engine under FASTRNN_PERSISTENT=1, which benchmarks/gpu_check.sh sets for its second pass) and Triton's, fp32
# (and fp64 where the backend stores it) against the same fp64 loop on the CPU; 16-bit storage is checked per
# layer in tests/test_cpp_ext.py and tests/test_triton_ext.py.
CUDA_EXT = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in ("cpp", "triton")
            for d in (torch.float32, torch.float64) if torch.cuda.is_available()
            and _backend.reason_unavailable(b, torch.device("cuda"), d) is None
            and "layer_norm" in getattr(_backend._module(b), "EXT_FEATURES", ())]

if CUDA_EXT:
    @pytest.mark.cuda
    @pytest.mark.parametrize("backend, dtype", CUDA_EXT)
    @pytest.mark.parametrize("form", ["batched", "packed"])
    @pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
    @pytest.mark.parametrize("features", FEATURES)
    @pytest.mark.parametrize("kind", KINDS)
    def test_cuda_module_matches_loop(kind, features, train, form, backend, dtype):
        m = make_module(kind, FEATURES[features], dtype, backend, num_layers=2, bidirectional=True)
        check_module(m.to("cuda").train(train), form, dtype, device="cuda")


@pytest.mark.parametrize("skew", [1.01, float("nan")], ids=["1%", "nan"])
def test_nudged_truth_excuses_no_real_error(monkeypatch, skew):
    """An fp32 output 1 % off, or NaN, fails check_module: the nudged truths of an ordinary draw excuse none of it."""
    m = make_module("LSTM", FEATURES["ln"], torch.float32, "reference")
    forward = m.forward
    monkeypatch.setattr(m, "forward", lambda *a: (lambda y, hn: (y * skew, hn))(*forward(*a)))
    with pytest.raises(AssertionError, match="one fp32 rounding"):
        check_module(m, "batched", torch.float32)


def test_nan_truth_is_no_draw_to_excuse():
    """A NaN weight makes the result and the fp64 truth NaN alike: check_module fails (the fallback's errors of
    inf on both sides must not compare as a match)."""
    m = make_module("LSTM", FEATURES["ln"], torch.float32, "reference")
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        check_module(m, "batched", torch.float32)


@pytest.mark.parametrize("backend", ext_backends(torch.float64))
@pytest.mark.parametrize("form", ["packed", "unbatched"])
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_input_forms_match_loop(kind, features, form, backend):
    m = make_module(kind, FEATURES[features], torch.float64, backend, num_layers=2, bidirectional=True)
    check_module(m, form, torch.float64)


@pytest.mark.parametrize("backend", ext_backends(torch.float64))
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lstm_proj_size_matches_loop(features, train, backend):
    m = make_module("LSTM", FEATURES[features], torch.float64, backend, H=6, proj_size=4, num_layers=2,
                    bidirectional=True).train(train)
    check_module(m, "batched", torch.float64)


@pytest.mark.parametrize("backend", ext_backends(torch.float64))
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(kind, features, backend):
    m = make_module(kind, FEATURES[features], torch.float64, backend, I=2, H=3, num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p for n, p in m.named_parameters() if "layer_norm" in n or n.endswith("l0")]
    seed = int(torch.randint(1 << 30, ()))

    def f(x, *ps):
        torch.manual_seed(seed)  # the same masks at every evaluation: the function gradcheck differentiates
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(
                [n for n, p in m.named_parameters() if any(p is q for q in params)], ps))):
            out, hn = m(x)
        return (out, *hn) if isinstance(hn, tuple) else (out, hn)

    assert torch.autograd.gradcheck(f, (x, *params))


# Cells: a sequence of calls against the loop, one step per call.
CELL_KINDS = {"LSTMCell": ("LSTM", {}), "GRUCell": ("GRU", {}), "RNNCell": ("RNN_TANH", {}),
              "RNNCell-relu": ("RNN_RELU", {"nonlinearity": "relu"})}


@pytest.mark.parametrize("backend", ext_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("cell", CELL_KINDS)
def test_cell_sequence_matches_loop(cell, features, train, dtype, backend):
    skip_unless_runs(backend, dtype)
    mode, extra = CELL_KINDS[cell]
    m = getattr(fastrnn, cell.split("-")[0])(3, 5, dtype=dtype, backend=backend, **extra, **FEATURES[features])
    m = perturb_layer_norm(m).train(train)
    T, B = 4, 3
    x = torch.randn(T, B, 3, dtype=dtype, requires_grad=True)
    with MaskRecorder(m)() as rec:
        state, ys = None, []
        for t in range(T):
            state = m(x[t], state)
            ys.append(state[0] if mode == "LSTM" else state)
    y = torch.stack(ys)
    zoneouts = [mk.double() for mk in rec.of("_zoneout_mask")]
    per_step = 2 if mode == "LSTM" else 1
    drops = [mk.double() for mk in rec.of("_recurrent_dropout_mask")]
    assert len(drops) == (1 if m.recurrent_dropout and train else 0), "one draw for the whole sequence of calls"
    zh = torch.stack(zoneouts[0::per_step]) if m.zoneout else None
    zc = torch.stack(zoneouts[1::per_step]) if m.zoneout and mode == "LSTM" else None

    m64, x64 = copy.deepcopy(m).double(), x.detach().double().requires_grad_()
    h0 = torch.zeros(B, 5, dtype=torch.float64)
    want, _, _ = loop_layer(mode, x64, torch.full((B,), T), h0, h0 if mode == "LSTM" else None, layer_params(m64, ""),
                            False, zh, zc, drops[0] if drops else None)
    table = TOL_LAYER_NORM if m.layer_norm else TOL
    assert_close(y, want.to(dtype), "y", table)
    gy = torch.randn_like(want)
    got = torch.autograd.grad((y * gy.to(dtype)).sum(), [x] + list(m.parameters()))
    expected = torch.autograd.grad((want * gy).sum(), [x64] + list(m64.parameters()))
    for n, g, w in zip(["x"] + [n for n, _ in m.named_parameters()], got, expected):
        assert_close(g, w.to(dtype), f"d{n}", table)


def test_cell_recurrent_dropout_mask_lifetime():
    m = fastrnn.GRUCell(3, 64, recurrent_dropout=0.5)
    x = torch.randn(2, 3)
    with MaskRecorder(m)() as rec:
        h = m(x)
        h = m(x, h)
        m.reset_dropout_mask()
        h = m(x, h)
        m(torch.randn(5, 3))  # another batch size starts a sequence
    drawn = rec.of("_recurrent_dropout_mask")
    assert len(drawn) == 3 and drawn[2].shape == (5, 64) and not torch.equal(drawn[0], drawn[1])


# Randomness: a seed reproduces the draws, eval draws nothing.
@pytest.mark.parametrize("features", ["zo", "rd", "ln-zo-rd"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_masks_and_eval_is_deterministic(kind, features):
    m = make_module(kind, FEATURES[features], torch.float32, "auto", num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 3)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outs.append(m(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(4321)
    assert not torch.equal(m(x)[0], outs[0]), "another seed drew the same masks"
    m.eval()
    state = torch.get_rng_state()
    first = m(x)[0]
    assert torch.equal(torch.get_rng_state(), state), "eval consumed random numbers"
    torch.testing.assert_close(m(x)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_mask_rates(p):
    """Zoneout keeps the previous state at rate p; recurrent dropout zeroes at rate p and scales by 1/(1-p)."""
    m = fastrnn.LSTM(3, 64, zoneout=p, recurrent_dropout=p)
    with MaskRecorder(m)() as rec:
        m(torch.randn(50, 20, 3))
    zh, zc, rm = rec.masks
    for z in (zh, zc):
        assert set(z.unique().tolist()) <= {0.0, 1.0}
        assert abs(z.mean().item() - p) < 0.02
    assert abs((rm == 0).float().mean().item() - p) < 0.06
    torch.testing.assert_close(rm[rm != 0], torch.full_like(rm[rm != 0], 1 / (1 - p)))
    assert not torch.equal(zh, zc[:, :64]), "h and c must draw their own zoneout masks"


# Parameters, state_dict, construction.
@pytest.mark.parametrize("kind", KINDS)
def test_all_off_is_torch_nn(kind):
    cls, extra = KINDS[kind]
    torch.manual_seed(7)
    ref = getattr(torch.nn, cls)(3, 5, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(7)
    fast = getattr(fastrnn, cls)(3, 5, num_layers=2, bidirectional=True, layer_norm=False, zoneout=0.0,
                                 recurrent_dropout=0.0, **extra)
    assert list(fast.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    assert repr(fast) == repr(ref)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_norm_parameters(kind, bidirectional):
    cls, extra = KINDS[kind]
    m = getattr(fastrnn, cls)(3, 5, num_layers=2, bidirectional=bidirectional, layer_norm=True, **extra)
    G = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    want = {}
    for layer, sfx in itertools.product(range(2), ["", "_reverse"][: 2 if bidirectional else 1]):
        for part, width in [("ih", G * 5), ("hh", G * 5)] + ([("c", 5)] if kind == "LSTM" else []):
            want[f"layer_norm_{part}_weight_l{layer}{sfx}"] = torch.ones(width)
            want[f"layer_norm_{part}_bias_l{layer}{sfx}"] = torch.zeros(width)
    got = {n: p for n, p in m.named_parameters() if n.startswith("layer_norm_")}
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n].detach(), want[n]), n
    m.reset_parameters()
    assert all(torch.equal(getattr(m, n).detach(), want[n]) for n in want)
    clone = getattr(fastrnn, cls)(3, 5, num_layers=2, bidirectional=bidirectional, layer_norm=True, **extra)
    clone.load_state_dict(m.state_dict(), strict=True)
    assert "layer_norm=True" in repr(m)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_layer_norm_parameters(cell):
    m = getattr(fastrnn, cell)(3, 5, layer_norm=True, zoneout=0.1, recurrent_dropout=0.2)
    names = {n for n, _ in m.named_parameters() if n.startswith("layer_norm_")}
    parts = ("ih", "hh", "c") if cell == "LSTMCell" else ("ih", "hh")
    assert names == {f"layer_norm_{p}_{k}" for p in parts for k in ("weight", "bias")}
    assert "zoneout=0.1" in repr(m) and "recurrent_dropout=0.2" in repr(m)


@pytest.mark.parametrize("bad, message", [
    (dict(layer_norm=1), "layer_norm must be a bool, got 1"),
    (dict(zoneout=1.5), r"zoneout must be a number in \[0, 1\], got 1.5"),
    (dict(recurrent_dropout=-0.1), r"recurrent_dropout must be a number in \[0, 1\], got -0.1"),
    (dict(zoneout="0.1"), r"zoneout must be a number in \[0, 1\], got '0.1'"),
])
@pytest.mark.parametrize("cls", ["LSTM", "GRUCell"])
def test_bad_options_are_named(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        getattr(fastrnn, cls)(3, 4, **bad)


def test_backend_without_the_feature_is_named(monkeypatch):
    # every backend runs the new cells: one pretends not to, by the declaration the modules read
    name = ext_backends()[-1]
    monkeypatch.setattr(_backend._module(name), "EXT_FEATURES", ())
    for name in [name]:
        m = fastrnn.GRU(3, 4, layer_norm=True, backend=name)
        with pytest.raises(RuntimeError, match=f"fastrnn backend '{name}' does not run layer_norm"):
            m(torch.randn(2, 1, 3))
        with _backend.use_backend(name):  # a process-wide choice is as explicit as the module's own
            with pytest.raises(RuntimeError, match=f"fastrnn backend '{name}' does not run zoneout"):
                fastrnn.GRU(3, 4, zoneout=0.5)(torch.randn(2, 1, 3))


@pytest.mark.parametrize("backend", ext_backends(torch.float64))
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_double_backward_gradgradcheck(kind, backend):
    """create_graph=True recomputes the layer, the new cells included, on differentiable ops."""
    m = make_module(kind, FEATURES["ln-zo-rd"], torch.float64, backend, I=2, H=3)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters() if n.startswith("layer_norm_hh") or n == "weight_hh_l0"]
    seed = int(torch.randint(1 << 30, ()))

    def f(x, *ps):
        torch.manual_seed(seed)
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, ps))):
            return m(x)[0]

    assert torch.autograd.gradgradcheck(f, (x, *[getattr(m, n) for n in names]))


@pytest.mark.parametrize("backend", ext_backends(torch.float64))
def test_per_sample_gradients_with_torch_func(backend):
    """vmap(grad(...)) over a functional_call of a LayerNorm/zoneout module (eval: deterministic) equals the
    gradients of each sample taken one at a time."""
    m = make_module("LSTM", FEATURES["ln-zo-rd"], torch.float64, backend).eval()
    params = {n: p.detach() for n, p in m.named_parameters()}
    xs = torch.randn(4, 5, 3, dtype=torch.float64)  # 4 samples of 5 steps, unbatched each

    def loss(p, x):
        return torch.func.functional_call(m, p, (x,))[0].square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        m.zero_grad()
        m(xs[i])[0].square().sum().backward()
        for n, p in m.named_parameters():
            assert_close(per_sample[n][i], p.grad, f"sample {i} d{n}")
