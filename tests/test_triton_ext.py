"""The Triton backend's fastrnn cells (LayerNorm, zoneout, recurrent dropout: fastrnn/ops/triton/ext.py) on the
layer level, against the reference backend in fp64: every output and every gradient (the LayerNorm parameters'
too), with what the module tests (tests/test_cells_ext.py) do not reach: NaN-filled buffers, T = 1, H = 1, odd
H, rows wider than one chunk, 16-bit, inference without saved activations, determinism and the fake kernel.

Triton lacks fp64, so fp32 and bf16 are measured against the fp64 truth with the tolerance table of the
conftest. The kernels run in the Triton interpreter (slow): the cases are small.
"""

import functools

import pytest
import torch

from fastrnn import backend as _backend
from fastrnn.ops import MODES, CellExt, LayerArgs
from layer_cases import Case, Impl, fresh_values, make_inputs, one_step_and_one_unit
from test_cpp_ext import _ext_args, assert_layer_matches, make_ext, run

tb = _backend._module("triton")
CPU_REASON = _backend.reason_unavailable("triton", torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def _cpu_needs_the_interpreter(request):
    """The CPU cases run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set where no GPU is present);
    the CUDA cases need none."""
    if CPU_REASON is not None and request.node.get_closest_marker("cuda") is None:
        pytest.skip(f"Triton on the CPU: {CPU_REASON}")


def assert_matches_fp64(c: Case, dtype: torch.dtype, feature: str, variant: str):
    """Triton's ``variant`` in ``dtype`` against the reference backend on fp64 copies of the same inputs (a
    NaN-filled element a kernel did not write shows as non-finite); returns Triton's outputs and gradients."""
    inputs = make_inputs(c, Impl("triton", "cpu", dtype))
    return assert_layer_matches(functools.partial(tb.layer, variant=variant), c, inputs,
                                make_ext(c, inputs, feature), torch.float64)


def with_variants(cases):
    """Each case with every variant that runs it: the step loop, and the whole-sequence kernels where there is
    no projection."""
    return [pytest.param(c, v, id=f"{c.id}-{v}") for c in cases for v in ("step",) + (("seq",) if not c.proj else ())]


def test_buffers_start_nan_filled():
    """Under the interpreter every kernel output and workspace starts NaN (host.nan_fill), so the finiteness
    checks below catch an element a kernel forgot to write."""
    assert tb._host.nan_fill()


CASES = [Case(m, 4, 3, 3, 5, packed=p, reverse=p) for m in MODES for p in (False, True)] + \
    [Case("LSTM", 4, 3, 3, 5, proj=3), Case("LSTM", 4, 3, 3, 5, proj=3, packed=True, reverse=True),
     Case("GRU", 3, 2, 3, 4, bias=False), Case("LSTM", 3, 2, 3, 4, proj=2, bias=False, packed=True)]


@pytest.mark.parametrize("c, variant", with_variants(CASES))
def test_all_features_match_fp64(c, variant):
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", variant)


@pytest.mark.parametrize("feature", ["ln", "zo", "rd", "ln-zo_eval"])
@pytest.mark.parametrize("c, variant", with_variants([Case(m, 3, 3, 3, 5, packed=True, reverse=m != "GRU")
                                                      for m in MODES] + [Case("LSTM", 3, 3, 3, 5, proj=3, packed=True)]))
def test_each_feature_matches_fp64(c, variant, feature):
    assert_matches_fp64(c, torch.float32, feature, variant)


@pytest.mark.parametrize("c, variant", with_variants(one_step_and_one_unit(3)))
def test_one_step_and_one_unit(c, variant):
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", variant)


@pytest.mark.parametrize("c, variant", with_variants([
    Case("LSTM", 3, 3, 4, 63, proj=7, packed=True), Case("GRU", 3, 2, 4, 63, reverse=True),
    Case("LSTM", 2, 2, 3, 1030), Case("RNN_TANH", 2, 3, 3, 1030, packed=True)]))
def test_odd_and_wide_rows(c, variant):
    """H = 63: masked chunk tails; H = 1030: rows wider than ext.MAX_CHUNK, so every row loop (the statistics,
    LSTM's c passes, the LayerNorm backward) runs over more than one chunk, and the seq kernels' products over
    several column blocks and K chunks."""
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", variant)


@pytest.mark.parametrize("c, variant", with_variants([Case("LSTM", 3, 0, 3, 4), Case("LSTM", 3, 0, 3, 4, proj=2),
                                                      Case("GRU", 3, 0, 3, 4)]))
def test_empty_batch(c, variant):
    """B = 0 (no rows at all): empty outputs, the states' empty gradients and zero weight gradients."""
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", variant)


@pytest.mark.parametrize("c, variant", with_variants([Case("LSTM", 4, 3, 3, 8, proj=4, packed=True),
                                                      Case("GRU", 4, 3, 3, 8, reverse=True)]))
def test_bf16_against_fp64(c, variant):
    """16-bit storage is computed in fp32: only the inputs and the returned values are rounded."""
    assert_matches_fp64(c, torch.bfloat16, "ln-zo-rd", variant)


@pytest.mark.parametrize("c, variant", with_variants([Case("LSTM", 4, 3, 3, 6, proj=3, packed=True),
                                                      Case("LSTM", 4, 3, 3, 6, packed=True),
                                                      Case("GRU", 4, 3, 3, 6, packed=True)]))
def test_inference_and_determinism(c, variant):
    """Without a gradient nothing is saved (another code path of the kernels) and the outputs are the same bits;
    the LayerNorm parameters' gradients (per-row sums, no atomics) are the same bits on every run."""
    layer = functools.partial(tb.layer, variant=variant)
    inputs = make_inputs(c, Impl("triton", "cpu", torch.float32))
    ext = make_ext(c, inputs, "ln-zo-rd")
    outs, grads = run(layer, c, inputs, ext)
    with torch.no_grad():
        plain = [o for o in layer(c.mode, reverse=c.reverse, ext=ext, **inputs) if o is not None]
    for got, want in zip(plain, outs):
        assert torch.equal(got, want)
    again = run(layer, c, inputs, ext)[1]
    for name in grads:
        assert torch.equal(again[name], grads[name]), name


@pytest.mark.parametrize("c", [Case("GRU", 4, 20, 3, 6, packed=True, reverse=True), Case("LSTM", 3, 5, 3, 40)],
                         ids=lambda c: c.id)
def test_seq_and_step_agree(c):
    """The whole-sequence kernels against the step loop on the same inputs: the same cell code, only the
    recurrent product summed in another order, so they agree to fp32 rounding (each case has more rows than
    one program's tile, so several programs keep their rows apart)."""
    for backward in (False, True):
        assert c.B > tb._ext.seq_tiles(c.H, 3 if c.mode == "GRU" else 4, backward)["BR"]
    inputs = make_inputs(c, Impl("triton", "cpu", torch.float32))
    ext = make_ext(c, inputs, "ln-zo-rd")
    step = run(functools.partial(tb.layer, variant="step"), c, inputs, ext)
    seq = run(functools.partial(tb.layer, variant="seq"), c, inputs, ext)
    for got, want in zip(seq[0], step[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in step[1]:
        torch.testing.assert_close(seq[1][name], step[1][name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("c", [Case("LSTM", 4, 3, 3, 5, proj=3, packed=True, reverse=True),
                               Case("LSTM", 3, 3, 3, 5, packed=True), Case("GRU", 4, 3, 3, 5, packed=True)],
                         ids=lambda c: c.id)
def test_graph_replays_read_every_input_afresh(emulated_cuda_graphs, c):
    """The step loop replayed as ``cuda_graph=True`` replays it (emulated on the CPU: conftest's
    ``emulated_cuda_graphs``): calls of one shape with fresh inputs, LayerNorm parameters and masks each give the
    loop's own outputs and gradients bit for bit, from one forward and one backward capture."""
    first = make_inputs(c, Impl("triton", "cpu", torch.float32))
    for seed in range(3):
        inputs = fresh_values(first, seed) if seed else first
        ext = make_ext(c, inputs, "ln-zo-rd", seed=seed)
        want = run(functools.partial(tb.layer, variant="step", cuda_graph=False), c, inputs, ext)
        got = run(functools.partial(tb.layer, variant="step", cuda_graph=True), c, inputs, ext)
        for a, b in zip(got[0], want[0]):
            assert torch.equal(a, b)
        for name in want[1]:
            assert torch.equal(got[1][name], want[1][name]), name
        # captured on the shape's second call, replayed on the third
        assert [k[0][0] for k in emulated_cuda_graphs] == (["ext_fwd", "ext_bwd"] if seed else [])


@pytest.mark.parametrize("version, key", [(v, k) for v, table in tb._ext.SEQ_TILE_OVERRIDES.items() for k in table],
                         ids=lambda p: p if isinstance(p, str) else f"{p[0]}-h{p[1]}")
def test_seq_tiles_chosen_for_other_tritons(monkeypatch, version, key):
    """The tiles another Triton version takes (ext.SEQ_TILE_OVERRIDES; compiled there by kernel_report.py) run
    here too: the case is sized to the override's H tile and checked against fp64."""
    monkeypatch.setattr(tb._ext, "SEQ_TILE", tb._ext.SEQ_TILE_OVERRIDES[version][key])
    c = Case("LSTM" if key[0] == "fwd" else "RNN_TANH", 2, 3, 3, key[1], packed=True, reverse=True)
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", "seq")


def test_variant_choice():
    """Unasked, the cells take the step loop on the CPU (the seq kernels are the default only on CUDA with
    FASTRNN_PERSISTENT=1 until they have run on a GPU); the plain cells' persist variant, which a module's options
    may carry for its plain calls, leaves the cells on their default; a CUDA graph on the CPU, "seq" with a
    projection and an unknown variant are refused with the reason."""
    a = LayerArgs("LSTM", torch.zeros(4, 3), None, torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(16, 3),
                  torch.zeros(16, 4), None, None, None, False)
    assert tb._resolve_options(a, (None, None), True) == ("step", False)
    assert tb._resolve_options(a, ("seq", None), True) == ("seq", False)
    assert tb._resolve_options(a, ("persist", None), True) == ("step", False)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors, got x on cpu"):
        tb._resolve_options(a, ("persist", True), True)
    with pytest.raises(ValueError, match="variant must be one of"):
        tb._resolve_options(a, ("fast", None), True)
    with pytest.raises(ValueError, match="projection"):
        tb._resolve_options(a._replace(w_hr=torch.zeros(2, 4)), ("seq", None), True)


def test_seq_tiles_follow_the_triton_version(monkeypatch):
    """seq_tiles takes a version's override where it has one and SEQ_TILE elsewhere."""
    if not tb._ext.SEQ_TILE_OVERRIDES:
        pytest.skip("no Triton version takes other seq tiles")
    version, table = next(iter(tb._ext.SEQ_TILE_OVERRIDES.items()))
    (kind, h), tile = next(iter(table.items()))
    monkeypatch.setattr(tb._ext.triton, "__version__", version + ".9")
    assert tb._ext.seq_tiles(h, 4, kind == "bwd")["num_warps"] == tile[0]
    monkeypatch.setattr(tb._ext.triton, "__version__", "0.0.0")
    assert tb._ext.seq_tiles(h, 4, kind == "bwd")["num_warps"] == tb._ext.SEQ_TILE[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_kernel_matches(dtype):
    """The fake kernel gives the saved activations' shapes and dtypes (fp32 always) for torch.compile."""
    c = Case("LSTM", 3, 2, 3, 4, proj=2, packed=True)
    inputs = make_inputs(c, Impl("triton", "cpu", dtype))
    # then the options (variant, cuda_graph) and save
    args = _ext_args(c, inputs, make_ext(c, inputs, "ln-zo-rd")) + (None, False, True)
    torch.library.opcheck(tb.layer.ext_fwd, args, test_utils=("test_faketensor",))


CUDA_DTYPES = [d for d in (torch.float32, torch.bfloat16) if torch.cuda.is_available()
               and _backend.reason_unavailable("triton", torch.device("cuda"), d) is None]


if CUDA_DTYPES:  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("feature", ["ln-zo-rd", "ln", "zo", "rd"])
    @pytest.mark.parametrize("c, variant", with_variants(
        CASES + [Case("LSTM", 2, 2, 3, 1030), Case("GRU", 3, 2, 4, 63, reverse=True),
                 Case("LSTM", 6, 40, 3, 48, packed=True, reverse=True)]))
    def test_cuda_matches_fp64(c, variant, feature, dtype):
        """fastrnn/ops/triton/ext.py compiled for the GPU, both variants, against the reference backend in fp64
        (16-bit: the reference in the same dtype, as tests/test_cpp_ext.py judges 16-bit); 40 rows make several
        seq programs."""
        from test_cpp_ext import cuda_inputs

        inputs, ext = cuda_inputs(c, dtype, feature)
        assert_layer_matches(functools.partial(tb.layer, variant=variant), c, inputs, ext,
                             torch.float64 if dtype == torch.float32 else None)

    @pytest.mark.cuda
    @pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("c", [Case("LSTM", 5, 4, 3, 40, proj=3, packed=True, reverse=True),
                                   Case("GRU", 5, 4, 3, 40, packed=True)], ids=lambda c: c.id)
    def test_cuda_graph_replays_match(c, dtype, monkeypatch):
        """The step loop replayed from real CUDA graphs: calls of one shape with fresh inputs, LayerNorm
        parameters and masks each give the unreplayed loop's outputs and gradients."""
        host = tb._host
        monkeypatch.setattr(host, "_GRAPHS", type(host._GRAPHS)())
        monkeypatch.setattr(host, "_SEEN", type(host._SEEN)())
        move = lambda t: t if t is None or t.dtype == torch.int64 else t.to("cuda")  # noqa: E731
        first = make_inputs(c, Impl("triton", "cpu", dtype))
        for seed in range(3):
            inputs = fresh_values(first, seed) if seed else first
            ext = CellExt(*map(move, make_ext(c, inputs, "ln-zo-rd", seed=seed)))
            inputs = {k: move(v) for k, v in inputs.items()}
            want = run(functools.partial(tb.layer, variant="step", cuda_graph=False), c, inputs, ext)
            got = run(functools.partial(tb.layer, variant="step", cuda_graph=True), c, inputs, ext)
            for a, b in zip(got[0], want[0]):
                torch.testing.assert_close(a, b)
            for name in want[1]:
                torch.testing.assert_close(got[1][name], want[1][name], msg=name)
        assert [k[0][0] for k in host._GRAPHS] == ["ext_fwd", "ext_bwd"]
