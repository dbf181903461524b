"""The cpp backend's fused LayerNorm / zoneout / recurrent-dropout cells on the layer level, against the reference
backend: every output and every gradient (the LayerNorm parameters' too), with what the module tests do not
reach: NaN-filled workspaces, small backward chunks, H = 1 and odd H, T = 1, non-contiguous inputs, 16-bit,
the fake kernels, and the C++ layer's own errors."""

from typing import Dict, Optional

import pytest
import torch

from conftest import TOL, TOL_LAYER_NORM, assert_close
from fastrnn import backend as _backend
from fastrnn.ops import EXT_GRAD_NAMES, GATES, GRAD_NAMES, MODES, CellExt, reference
from layer_cases import (Case, Impl, _with_grads, at_least_threads, backward_chunk_rows, make_inputs, nan_poisoned,
                         one_step_and_one_unit, option_cases)

cpp = _backend._module("cpp")
pytestmark = pytest.mark.skipif(_backend.reason_unavailable("cpp", torch.device("cpu"), torch.float64) is not None,
                                reason="fastrnn._C is not built")

FEATURES = {"ln": (True, None, False), "zo": (False, 0.3, False), "rd": (False, None, True),
            "ln-zo-rd": (True, 0.4, True), "ln-zo_eval": (True, 0.25, False)}


def make_ext(c: Case, inputs: Dict[str, Optional[torch.Tensor]], feature: str, seed: int = 0) -> CellExt:
    """LayerNorm parameters off their 1/0 initialisation; zoneout 0/1 draws (a fraction ``p`` everywhere for
    ``_eval``); a recurrent-dropout mask scaled by 1/(1-p)."""
    ln, zoneout, rec = FEATURES[feature]
    g = torch.Generator().manual_seed(seed + 7)
    x = inputs["x"]
    N, B, H, Hout = x.shape[0], inputs["h0"].shape[0], c.H, c.proj or c.H
    GH = GATES[c.mode] * H
    lstm = c.mode == "LSTM"

    def rnd(*shape, center=0.0):
        return (center + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(x.dtype)

    def zone(width):
        if feature.endswith("_eval"):
            return torch.full((N, width), zoneout, dtype=x.dtype)
        return torch.bernoulli(torch.full((N, width), zoneout, dtype=torch.float64), generator=g).to(x.dtype)

    params = [rnd(GH, center=1), rnd(GH), rnd(GH, center=1), rnd(GH)] if ln else [None] * 4
    params += [rnd(H, center=1), rnd(H)] if ln and lstm else [None, None]
    zh = zone(Hout) if zoneout else None
    zc = zone(H) if zoneout and lstm else None
    mask = (torch.bernoulli(torch.full((B, Hout), 0.6, dtype=torch.float64), generator=g) / 0.6).to(x.dtype) if rec \
        else None
    return CellExt(*params, zh, zc, mask)


def run(layer, c: Case, inputs, ext: CellExt, dtype=None):
    """Outputs of ``layer`` and the gradients of a random linear function of them w.r.t. every input and LayerNorm
    parameter; with ``dtype``, on copies of the inputs in that dtype."""
    cast = (lambda t: t if t is None or dtype is None or not t.is_floating_point() else t.to(dtype))  # noqa: E731
    inputs, ext = {k: cast(v) for k, v in inputs.items()}, CellExt(*map(cast, ext))
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRAD_NAMES if inputs[k] is not None}
    ln = {k: getattr(ext, k).detach().clone().requires_grad_() for k in EXT_GRAD_NAMES if getattr(ext, k) is not None}
    outs = [o for o in layer(c.mode, reverse=c.reverse, ext=ext._replace(**ln), **{**inputs, **leaves})
            if o is not None]
    return _with_grads(outs, {**leaves, **ln}, grad_seed=1)


def assert_matches_reference(c: Case, dtype: torch.dtype, feature: str, inputs=None, ext=None) -> None:
    """cpp in ``dtype`` against the reference backend in fp64 (16-bit: the reference in the same dtype, both
    computing in fp32 and rounding what they return)."""
    inputs = inputs if inputs is not None else make_inputs(c, Impl("cpp", "cpu", dtype))
    ext = ext if ext is not None else make_ext(c, inputs, feature)
    wide = dtype in (torch.float32, torch.float64)
    assert_layer_matches(cpp.layer, c, inputs, ext, torch.float64 if wide else None)


def assert_layer_matches(layer, c: Case, inputs, ext: CellExt, ref_dtype):
    """Every output and gradient of ``layer`` finite and within the tolerance table of the reference backend's on
    copies of the inputs in ``ref_dtype`` (``None``: as they are); returns ``layer``'s outputs and gradients."""
    outs, grads = run(layer, c, inputs, ext)
    ref_outs, ref_grads = run(reference.layer, c, inputs, ext, ref_dtype)
    table = TOL_LAYER_NORM if ext.layer_norm else TOL
    for name, got, want in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert_close(got, want.to(got.dtype), name, table)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.isfinite(grads[name]).all(), f"d{name} has non-finite values"
        assert_close(grads[name], ref_grads[name].to(grads[name].dtype), f"d{name}", table)
    return outs, grads


@pytest.mark.parametrize("c", option_cases(T=5, B=3, I=4, H=6, P=4), ids=lambda c: c.id)
def test_all_features_match_reference(c):
    assert_matches_reference(c, torch.float64, "ln-zo-rd")


@pytest.mark.parametrize("feature", [f for f in FEATURES if f != "ln-zo-rd"])
@pytest.mark.parametrize("c", [Case(m, 4, 3, 3, 5, packed=True, reverse=True) for m in MODES]
                         + [Case("LSTM", 4, 3, 3, 5, proj=3)], ids=lambda c: c.id)
def test_each_feature_matches_reference(c, feature):
    assert_matches_reference(c, torch.float64, feature)


@pytest.mark.parametrize("c", one_step_and_one_unit(4), ids=lambda c: c.id)
def test_one_step_and_one_unit(c):
    assert_matches_reference(c, torch.float64, "ln-zo-rd")


@pytest.mark.parametrize("c", [Case("LSTM", 3, 2, 5, 63, proj=7, packed=True), Case("GRU", 3, 2, 5, 513)],
                         ids=lambda c: c.id)
def test_odd_hidden_sizes_fp32(c):
    assert_matches_reference(c, torch.float32, "ln-zo-rd")


@pytest.mark.parametrize("feature", ["ln-zo-rd", "ln", "zo", "rd"])
@pytest.mark.parametrize("c", [Case(m, 6, 5, 4, 40, packed=True, reverse=r) for m in MODES for r in (False, True)]
                         + [Case("GRU", 3, 1, 4, 40)], ids=lambda c: c.id)
def test_fp32_on_the_team(c, feature):
    """fp32 runs on the CPU engine's team (per step each thread's GEMM columns, then its rows of the row kernel):
    widths that give two threads column blocks both ways (G*H and H over 32), an odd batch, packed steps with
    fewer rows than threads, NaN-filled workspaces and backward chunks that end inside steps."""
    with at_least_threads(2), nan_poisoned(Impl("cpp", "cpu", torch.float32)), backward_chunk_rows(7):
        assert_matches_reference(c, torch.float32, feature)


@pytest.mark.parametrize("mode", MODES)
def test_nan_poisoned_workspaces_across_small_chunks(mode):
    """Every workspace starts NaN and the backward crosses chunk boundaries inside and between steps."""
    cases = [Case(mode, 6, 4, 3, 5, packed=True, reverse=True), Case(mode, 5, 3, 3, 4, proj=3 if mode == "LSTM" else 0)]
    with nan_poisoned(Impl("cpp", "cpu", torch.float64)), backward_chunk_rows(5):
        for c in cases:
            for feature in ("ln-zo-rd", "zo", "rd"):
                assert_matches_reference(c, torch.float64, feature)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    c = Case(mode, 4, 3, 4, 5, proj=3 if mode == "LSTM" else 0, packed=True)
    inputs = make_inputs(c, Impl("cpp", "cpu", torch.float64))
    ext = make_ext(c, inputs, "ln-zo-rd")

    def strided(t):
        """The same values as a non-contiguous view: every other column (row for 1-D) of a wider tensor."""
        if t is None or t.dtype == torch.int64:
            return t
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view

    assert_matches_reference(c, torch.float64, "", {k: strided(v) for k, v in inputs.items()},
                             CellExt(*map(strided, ext)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_16bit_is_computed_in_fp32(mode, dtype):
    assert_matches_reference(Case(mode, 4, 3, 3, 8, packed=True), dtype, "ln-zo-rd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_fake_kernels_match(mode, dtype):
    """The meta kernels give the shapes and dtypes of the saved activations (fp32 for 16-bit) for torch.compile."""
    c = Case(mode, 3, 2, 3, 4, packed=True)
    inputs = make_inputs(c, Impl("cpp", "cpu", dtype))
    ext = make_ext(c, inputs, "ln-zo-rd")
    args = (c.mode, inputs["x"], inputs["batch_sizes"], inputs["h0"], inputs["c0"], inputs["w_ih"], inputs["w_hh"],
            inputs["b_ih"], inputs["b_hh"], inputs["w_hr"], False, *ext, True)
    torch.library.opcheck(cpp.layer.ext_fwd, args, test_utils=("test_faketensor",))


def test_features_off_run_the_plain_op():
    c = Case("GRU", 3, 2, 3, 4)
    inputs = make_inputs(c, Impl("cpp", "cpu", torch.float64))
    plain = cpp.layer(c.mode, reverse=False, **inputs)
    off = cpp.layer(c.mode, reverse=False, ext=CellExt(), **inputs)
    torch.testing.assert_close(off.y, plain.y, rtol=0, atol=0)


def _ext_args(c: Case, inputs, ext: CellExt, **changes):
    e = ext._replace(**changes)
    return (c.mode, inputs["x"], inputs["batch_sizes"], inputs["h0"], inputs["c0"], inputs["w_ih"], inputs["w_hh"],
            inputs["b_ih"], inputs["b_hh"], inputs["w_hr"], False, *e)


D = dict(dtype=torch.float64)
BAD_EXT = [
    ("LSTM", dict(ln_ih_weight=torch.ones(23, **D)), r"ln_ih_weight must have shape \[24\], got \[23\]"),
    ("LSTM", dict(ln_c_bias=torch.zeros(7, **D)), r"ln_c_bias must have shape \[6\], got \[7\]"),
    ("GRU", dict(ln_hh_bias=None), r"LayerNorm needs all of ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias or "
                                   r"none"),
    ("GRU", dict(zoneout_c=torch.zeros(6, 6, **D)), r"zoneout_c is only for LSTM, got it for mode GRU"),
    ("LSTM", dict(zoneout_c=None), r"LSTM zoneout needs both zoneout_h and zoneout_c"),
    ("RNN_TANH", dict(zoneout_h=torch.zeros(6, 5, **D)), r"zoneout_h must have shape \[6, 6\], got \[6, 5\]"),
    ("GRU", dict(rec_mask=torch.ones(2, 6)), r"rec_mask must have dtype (torch\.)?(float64|Double) like x, got"),
    ("GRU", dict(rec_mask=torch.ones(3, 6, **D)), r"rec_mask must have shape \[2, 6\], got \[3, 6\]"),
]


@pytest.mark.parametrize("mode, change, message", BAD_EXT, ids=[f"{m}-{next(iter(ch))}" for m, ch, _ in BAD_EXT])
@pytest.mark.parametrize("via", ["python", "cpp"])
def test_bad_ext_is_named(mode, change, message, via):
    """Python's check_ext and the C++ layer's own checks name the argument, the expected and the actual."""
    c = Case(mode, 3, 2, 3, 6)
    inputs = make_inputs(c, Impl("cpp", "cpu", torch.float64))
    args = _ext_args(c, inputs, make_ext(c, inputs, "ln-zo-rd"), **change)
    with pytest.raises(RuntimeError, match=message):
        if via == "python":
            cpp.layer(*args[:11], ext=CellExt(*args[11:]))
        else:
            cpp._lib().layer_ext_fwd(*args[:11], list(args[11:]), False)


CUDA_DTYPES = [d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16) if torch.cuda.is_available()
               and _backend.reason_unavailable("cpp", torch.device("cuda"), d) is None]
CUDA_CASES = [Case(m, 5, 3, 4, 6, packed=p, reverse=p) for m in MODES for p in (False, True)] + [
    Case("LSTM", 4, 3, 3, 5, proj=3, packed=True), Case("GRU", 3, 2, 5, 513), Case("LSTM", 1, 3, 2, 1)]


def cuda_inputs(c: Case, dtype: torch.dtype, feature: str):
    """The CPU tests' inputs and CellExt, made on the CPU (same draws) and moved to the GPU; batch_sizes stays."""
    inputs = make_inputs(c, Impl("cpp", "cpu", dtype))
    ext = make_ext(c, inputs, feature)
    move = lambda t: t if t is None or t.dtype == torch.int64 else t.to("cuda")  # noqa: E731
    return {k: move(v) for k, v in inputs.items()}, CellExt(*map(move, ext))


if CUDA_DTYPES:  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("feature", ["ln-zo-rd", "ln", "zo", "rd", "ln-zo_eval"])
    @pytest.mark.parametrize("c", CUDA_CASES, ids=lambda c: c.id)
    def test_cuda_matches_reference(c, feature, dtype):
        """csrc/cuda/cell_ln_cuda.cu against the equations (the reference backend): fp32/fp64 against fp64, 16-bit against
        the reference in the same dtype (both compute in fp32), NaN-filled workspaces."""
        inputs, ext = cuda_inputs(c, dtype, feature)
        with nan_poisoned(Impl("cpp", "cuda", dtype)):
            outs, _ = assert_layer_matches(cpp.layer, c, inputs, ext,
                                           torch.float64 if dtype in (torch.float32, torch.float64) else None)
        assert all(o.is_cuda for o in outs)
