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
from layer_cases import Case, Impl, fresh_values, make_inputs, nan_poisoned, one_step_and_one_unit
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


def with_variants(cases, variants=tb.EXT_VARIANTS, cuda: bool = False):
    """Each case with every one of ``variants`` that runs it: the step loop, and the whole-sequence kernels (one
    program per batch tile, or the tile split over hidden slices) where there is no projection (on a GPU the split
    from H = ext.PERSIST_MIN_H)."""
    def runs(c: Case, v: str) -> bool:
        return v == "step" or not c.proj and (v != "persist" or not cuda or c.H >= tb._ext.PERSIST_MIN_H)

    return [pytest.param(c, v, id=f"{c.id}-{v}") for c in cases for v in variants if runs(c, v)]


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
    Case("LSTM", 3, 3, 4, 63, proj=7, packed=True), Case("GRU", 3, 2, 4, 63, reverse=True)]) + with_variants([
        Case("LSTM", 2, 2, 3, 1030), Case("RNN_TANH", 2, 3, 3, 1030, packed=True)], ("step", "seq")) + with_variants([
            Case("LSTM", 2, 1, 3, 1030), Case("RNN_TANH", 2, 3, 3, 300, packed=True)], ("persist",)))
def test_odd_and_wide_rows(c, variant):
    """H = 63: masked chunk tails; H = 1030: rows wider than ext.MAX_CHUNK, so every row loop (the statistics,
    LSTM's c passes, the LayerNorm backward) runs over more than one chunk, and the seq kernels' products over
    several column blocks and K chunks. The persist kernels' row pass takes chunks of at most 128 columns and their
    products 16-row blocks, whose masked rows the interpreter would spend minutes on at B = 2: their wide cases
    are B = 1 (one-row tiles) at H = 1030, and H = 300 (three chunks)."""
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


@pytest.mark.parametrize("variant", ["seq", "persist"])
@pytest.mark.parametrize("c", [Case("GRU", 4, 20, 3, 20, packed=True, reverse=True), Case("LSTM", 3, 5, 3, 40)],
                         ids=lambda c: c.id)
def test_seq_and_step_agree(c, variant):
    """The whole-sequence kernels against the step loop on the same inputs: the same cell code, only the
    recurrent product summed in another order, so they agree to fp32 rounding. Each case has more rows than one
    seq program's tile, so several programs keep their rows apart; persist splits every tile's products and rows
    over several slices, forward and backward (and the GRU's 20 rows over two tiles)."""
    for backward in (False, True):
        tiles = tb._ext.tiles_for(variant, c.B, c.H, 3 if c.mode == "GRU" else 4, backward, torch.device("cpu"))
        assert c.B > tiles["BR"] if variant == "seq" else tiles["S"] > 1
    inputs = make_inputs(c, Impl("triton", "cpu", torch.float32))
    ext = make_ext(c, inputs, "ln-zo-rd")
    step = run(functools.partial(tb.layer, variant="step"), c, inputs, ext)
    seq = run(functools.partial(tb.layer, variant=variant), c, inputs, ext)
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


@pytest.mark.parametrize("slices", [1, 3, 64])
def test_persist_slices(monkeypatch, slices):
    """The persist kernels over as many slices as the budget allows: one (the whole sequence in one launch, the
    barrier compiled in and waiting for the program alone), three (uneven columns: 160 = 3 x 64 - 32 forward,
    40 = 3 x 16 - 8 backward) and as many as there are 16-column blocks (10 forward, 3 backward; most slices
    without a row of the tile's 3 in the row pass), against fp64."""
    monkeypatch.setattr(tb._ext, "INTERPRETED_SLICES", slices)
    c = Case("LSTM", 3, 3, 3, 40, packed=True, reverse=True)
    want = {1: (1, 1), 3: (3, 3), 64: (10, 3)}[slices]
    assert tuple(tb._ext.persist_tiles(c.B, c.H, 4, bwd, None)["S"] for bwd in (False, True)) == want
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", "persist")


@pytest.mark.parametrize("variant", ["seq", "persist"])
def test_one_slice_as_a_gpu_compiles_it(variant, monkeypatch):
    """The whole-sequence kernels over one slice as a GPU compiles them ("seq" always, "persist" where one slice
    takes every column), without the barrier (persist.INTERPRETED_BARRIER off), against fp64."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "INTERPRETED_BARRIER", False)
    monkeypatch.setattr(tb._ext, "INTERPRETED_SLICES", 1)
    c = Case("LSTM", 3, 3, 3, 40, packed=True, reverse=True)
    assert all(tb._ext.tiles_for(variant, c.B, c.H, 4, bwd, torch.device("cpu"))["S"] == 1 for bwd in (False, True))
    assert_matches_fp64(c, torch.float32, "ln-zo-rd", variant)
    assert_matches_fp64(Case("GRU", 2, 4, 3, 17), torch.float32, "ln-zo-rd", variant)


def test_persist_split_into_launches(monkeypatch):
    """The persist kernels over a sequence whose barrier counts would pass persist.MAX_ARRIVALS (lowered here to
    two steps' of one slice, four arrivals) in launches of two steps each, the state handed on in memory, against
    fp64."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(tb._ext, "INTERPRETED_SLICES", 1)
    monkeypatch.setattr(persist, "MAX_ARRIVALS", 4)
    assert_matches_fp64(Case("LSTM", 5, 3, 3, 40, packed=True, reverse=True), torch.float32, "ln-zo-rd", "persist")


def test_persist_tiles_cover_every_column():
    """Every product column in exactly one slice (CW a multiple of the 16-column block, no empty slice), a row pass
    that covers the tile's rows (one per slice, or all in the first), never more programs than the device holds,
    and no GPU plan where the batch tiles alone exceed it or H < PERSIST_MIN_H."""
    for B in (1, 2, 16, 17, 100, 2048):
        for H in (1, 15, 16, 100, 128, 1024):
            for G in (1, 3, 4):
                for backward in (False, True):
                    NC = H if backward else G * H
                    for sms in (1, 7, 132, None):
                        t = tb._ext.persist_tiles(B, H, G, backward, sms)
                        tiles = -(-B // (1 if B == 1 else tb._ext.PERSIST_ROWS))
                        if sms is not None and (tiles > sms or H < tb._ext.PERSIST_MIN_H):
                            assert t is None
                            continue
                        assert t["CW"] % 16 == 0 and (t["S"] - 1) * t["CW"] < NC <= t["S"] * t["CW"]
                        assert -(-B // t["BR"]) == tiles and t["RB"] in (1, t["BR"])
                        assert t["S"] * t["RB"] >= t["BR"] and (t["RB"] == 1 or t["S"] < t["BR"])
                        assert tiles * t["S"] <= (sms or tiles * tb._ext.INTERPRETED_SLICES)


def test_spill_free_tile_choice(monkeypatch):
    """A GPU launch of the persist kernels compiles PERSIST_TILES in order (without launching) and takes the first
    whose kernel does not spill, once per configuration (what the options follow from, the tensors' dtypes and
    alignment, the specialised ints), building the candidates' options only then; the first where every candidate
    spills; a candidate the device cannot hold is passed over. Exercised with a stand-in for Triton's compiled
    kernel, which needs a GPU to report its spills."""
    from fastrnn.ops.triton import persist

    ext = tb._ext
    monkeypatch.setattr(persist, "_FIRST_CLEAN", {})
    monkeypatch.setattr(ext, "PERSIST_TILES", ((4, 2048, 128), (8, 4096, 256), (4, 2048, 64)))
    compiled, built = [], []

    class Kernel:
        fn = test_spill_free_tile_choice

        def __init__(self, spills):
            self.spills = spills

        def warmup(self, *args, grid, **options):
            compiled.append(options["tile"])
            return type("Compiled", (), {"_init_handles": lambda _: None, "n_spills": self.spills[options["tile"]]})()

    def options_of(G):
        def of(tile):
            built.append(tile)
            return {"tile": tile, "G": G}
        return of

    args = (torch.zeros(4), 16)
    spills = {(4, 2048, 128): 3, (8, 4096, 256): 0, (4, 2048, 64): 0}
    assert ext._spill_free(Kernel(spills), (1, 2), args, options_of(4), (16, 256)) == (8, 4096, 256)
    assert ext._spill_free(Kernel(spills), (1, 2), args, options_of(4), (16, 256)) == (8, 4096, 256)
    assert compiled == built == [(4, 2048, 128), (8, 4096, 256)]  # the second call remembered, building nothing
    every = dict.fromkeys(spills, 2)
    assert ext._spill_free(Kernel(every), (1, 2), args, options_of(3), (16, 512)) == (4, 2048, 128)
    assert len(compiled) == 5
    # the same problem in another dtype, and with an int argument of 1 (Triton compiles it as a constant): its own
    other = {(4, 2048, 128): 3, (8, 4096, 256): 5, (4, 2048, 64): 0}
    assert ext._spill_free(Kernel(other), (1, 2), (torch.zeros(4, dtype=torch.bfloat16), 16), options_of(4),
                           (16, 256)) == (4, 2048, 64)
    assert ext._spill_free(Kernel(other), (1, 2), (torch.zeros(4), 1), options_of(4), (16, 256)) == (4, 2048, 64)
    assert len(compiled) == 11

    class Big(Kernel):
        def warmup(self, *args, grid, **options):
            if options["tile"] == (4, 2048, 128):
                compiled.append("refused")
                raise persist.OutOfResources(300000, 232448, "shared memory")
            return super().warmup(*args, grid=grid, **options)

    assert ext._spill_free(Big(spills), (1, 2), args, options_of(4), (1, 256)) == (8, 4096, 256)
    assert compiled[11:] == ["refused", (8, 4096, 256)]


def test_unspecialised_arguments_are_the_kernels_own():
    """The kernels' do_not_specialize names (the whole-sequence kernels' step range and T, the step and row kernels'
    row counts, so that one compile serves every length and batch and is the one benchmarks/kernel_report.py
    checks) are their parameters: Triton ignores a misspelt one."""
    from fastrnn.ops.triton import persist as tp, seq as ts, step as tst

    def unspecialised(k) -> set:  # a JITFunction's, or the interpreter's record of the decorator's arguments
        return set(getattr(k, "do_not_specialize", None) or getattr(k, "kwargs", {}).get("do_not_specialize") or ())

    for k, want in ((tb._ext._fwd_seq_kernel, {"k_begin", "k_end", "T", "zero"}),
                    (tb._ext._bwd_seq_kernel, {"k_begin", "k_end", "T", "zero"}),
                    (tp._fwd_persist_kernel, {"k_begin", "k_end", "T", "zero"}),
                    (tp._bwd_persist_kernel, {"j_begin", "j_end", "T", "zero"}),
                    (ts._fwd_seq_kernel, {"T", "B"}), (ts._bwd_seq_kernel, {"T", "B"}),
                    (tst._fwd_step_kernel, {"n_rows", "n_prev"}), (tst._bwd_step_kernel, {"n_rows", "n_prev"}),
                    (tb._ext._fwd_kernel, {"n_rows"}), (tb._ext._bwd_kernel, {"n_rows"}),
                    (tb._ext._ln_rows_kernel, {"n_rows"}), (tb._ext._ln_rows_bwd_kernel, {"n_rows"})):
        assert unspecialised(k) == want and want <= set(k.arg_names), (k, unspecialised(k))


def test_variant_choice():
    """Unasked, the cells take the step loop on the CPU (the whole-sequence kernels are the default only on CUDA
    with FASTRNN_PERSISTENT=1 until they have run on a GPU); a CUDA graph on the CPU, "seq" or "persist" with a
    projection and an unknown variant are refused with the reason."""
    a = LayerArgs("LSTM", torch.zeros(4, 3), None, torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(16, 3),
                  torch.zeros(16, 4), None, None, None, False)
    assert tb._resolve_options(a, (None, None), True) == ("step", False)
    assert tb._resolve_options(a, ("seq", None), True) == ("seq", False)
    assert tb._resolve_options(a, ("persist", None), True) == ("persist", False)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors, got x on cpu"):
        tb._resolve_options(a, ("persist", True), True)
    with pytest.raises(ValueError, match="variant must be one of"):
        tb._resolve_options(a, ("fast", None), True)
    for variant in ("seq", "persist"):
        with pytest.raises(ValueError, match=f"the '{variant}' variant of fastrnn's cells needs no projection"):
            tb._resolve_options(a._replace(w_hr=torch.zeros(2, 4)), (variant, None), True)
        # H alone decides, so a stand-in W_hh of G*H rows and no columns carries it without 8 GB of weights
        wide = LayerArgs("GRU", torch.zeros(4, 3), None, torch.zeros(2, 26755), None, torch.zeros(3 * 26755, 3),
                         torch.zeros(3 * 26755, 0), None, None, None, False)
        with pytest.raises(ValueError, match=f"the '{variant}' variant of fastrnn's cells addresses W_hh with int32 "
                                             r"offsets, so it needs 3\*H\*H < 2\^31, got H = 26755"):
            tb._resolve_options(wide, (variant, None), True)


def test_variant_choice_on_cuda(monkeypatch):
    """The rule on an H200-sized GPU (132 SMs; the device's count and FASTRNN_PERSISTENT stubbed): persist where
    the seq grid would leave half the SMs idle and H >= 128, seq where its batch rows fill the GPU or H is small,
    step with a projection or without FASTRNN_PERSISTENT=1; a batch of more tiles than SMs is refused persist."""
    ext, cuda = tb._ext, torch.device("cuda")
    monkeypatch.setattr(ext, "device_programs", lambda device: 132)
    monkeypatch.setattr(ext, "persist_enabled", lambda: True)
    assert ext.pick_variant(16, 512, 4, False, cuda) == "persist"
    assert ext.pick_variant(1, 128, 1, False, cuda) == "persist"
    assert ext.pick_variant(128, 512, 4, False, cuda) == "seq"  # 128 programs of one row each
    assert ext.pick_variant(16, 127, 4, False, cuda) == "seq"
    assert ext.pick_variant(16 * 133, 512, 4, False, cuda) == "seq"
    assert ext.pick_variant(16, 512, 4, True, cuda) == "step"
    # W_hh beyond int32 offsets: 4 * 23171^2 >= 2^31 > 4 * 23170^2 (the GRU's 3 gates reach it at 26,755)
    assert ext.pick_variant(16 * 133, 23170, 4, False, cuda) == "seq"
    assert ext.pick_variant(16 * 133, 23171, 4, False, cuda) == "step"
    assert ext.pick_variant(16 * 133, 26754, 3, False, cuda) == "seq"
    assert ext.pick_variant(16 * 133, 26755, 3, False, cuda) == "step"
    monkeypatch.setattr(ext, "persist_enabled", lambda: False)
    assert ext.pick_variant(16, 512, 4, False, cuda) == "step"
    monkeypatch.setattr(tb._host.persist, "device_programs", lambda device: 132)
    h0 = torch.zeros(16 * 133, 4)
    a = LayerArgs("LSTM", torch.zeros(4, 3), None, h0, h0, torch.zeros(16, 3), torch.zeros(16, 4), None, None, None,
                  False)
    with pytest.raises(ValueError, match="'persist' variant of fastrnn's cells needs H >= 128 on a GPU and no more "
                                         "batch tiles of 16 rows than the device's 132 SMs, got H = 4, batch 2128"):
        tb._resolve_options(a, ("persist", None), True)


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
                 Case("LSTM", 6, 40, 3, 48, packed=True, reverse=True), Case("GRU", 5, 20, 3, 128, packed=True),
                 Case("LSTM", 5, 20, 3, 144, packed=True, reverse=True), Case("RNN_TANH", 4, 1, 3, 130)], cuda=True))
    def test_cuda_matches_fp64(c, variant, feature, dtype):
        """fastrnn/ops/triton/ext.py compiled for the GPU, every variant, against the reference backend in fp64
        (16-bit: the reference in the same dtype, as tests/test_cpp_ext.py judges 16-bit), outputs and workspaces
        NaN-filled first; 40 rows make several seq programs, H = 128 to 144 several persist slices meeting at
        their barriers (20 rows: two batch tiles, packed rows ending mid-tile, both directions; B = 1: one-row
        tiles), which the interpreter's launch per pass never exercises."""
        from test_cpp_ext import cuda_inputs

        inputs, ext = cuda_inputs(c, dtype, feature)
        with nan_poisoned(Impl("triton", "cuda", dtype)):
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
