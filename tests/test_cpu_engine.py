"""The CPU engine (csrc/cpu/engine_cpu.cpp) in 16-bit: bf16 and fp16 outputs and gradients against an fp64
reference and against torch.nn's own error in the same dtype; thread-count independence of its layout; the
fake (meta) kernels of the ops in 16-bit; the engine at every ISA level FASTRNN_CPU_ISA allows."""

import os
import subprocess
import sys

import pytest
import torch

import fastrnn

from conftest import assert_close, nn_lstm_autocast_error
from fastrnn.ops import GATES, MODES, cpp, reference
from fastrnn.ops import GRAD_NAMES as NAMES
from layer_cases import (Case, Impl, assert_matches_reference, at_least_threads, backward_chunk_rows,  # noqa: F401
                         engine_in_short_training, engine_steps, in_place_share, intel_rules, nan_poisoned,
                         nn_module)
from layer_cases import make_inputs as make_impl_inputs

CPU64, CPU32 = Impl("cpp", "cpu", torch.float64), Impl("cpp", "cpu", torch.float32)


def make_inputs(c: Case):
    """fp64 CPU inputs, rounded to each dtype under test by the tests themselves."""
    return make_impl_inputs(c, CPU64)

pytestmark = [pytest.mark.skipif(
    cpp.availability(torch.device("cpu"), torch.bfloat16) is not None,
    reason=f"cpp backend unavailable: {cpp.availability(torch.device('cpu'), torch.bfloat16)}",
), pytest.mark.usefixtures("engine_in_short_training")]

# Relative error in norm, ||got - fp64|| / ||fp64||, of every output and gradient. bf16 keeps 8 significant
# bits (rounding 2^-9 = 2e-3 per stored value) and fp16 11 (2.4e-4); outputs, the GEMM operands and the
# gradients are rounded, so errors of a few roundings are expected; the bounds leave a factor ~3 of headroom
# over what the cases below measure.
REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
# and never further from fp64 than this multiple of torch.nn's own error in the same dtype
NN_FACTOR = 2.0
# RNN_RELU's gradients are discontinuous in the pre-activations: a unit whose pre-activation rounds across 0
# switches its whole gradient path on or off, so bf16 gradients land 5-10 % from fp64 (torch.nn's more) on
# well-scaled inputs. They are judged against torch.nn's error only (test_16bit_no_worse_than_torch_nn).
DISCONTINUOUS_GRADS = {"RNN_RELU"}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-300))


def outs_and_grads(impl, c: Case, inputs, dtype: torch.dtype):
    """impl.layer's outputs and the gradients of a random linear function of them (the same fp64 cotangents,
    rounded to dtype) w.r.t. every input, with the inputs rounded to dtype."""
    leaves = {k: inputs[k].detach().to(dtype).requires_grad_() for k in NAMES if inputs[k] is not None}
    args = {k: leaves.get(k, inputs[k]) for k in inputs}
    outs = [o for o in impl.layer(c.mode, reverse=c.reverse, **args) if o is not None]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(("y", "h_n", "c_n"), (o.detach() for o in outs))), {f"d{k}": v for k, v in zip(leaves, grads)}


def errors(c: Case, inputs, dtype: torch.dtype):
    want_o, want_g = outs_and_grads(reference, c, inputs, torch.float64)
    got_o, got_g = outs_and_grads(cpp, c, inputs, dtype)
    want, got = {**want_o, **want_g}, {**got_o, **got_g}
    for name, t in got.items():
        assert t.dtype == dtype, f"{name} is {t.dtype}, expected {dtype}"
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    return {name: rel_err(got[name], want[name]) for name in want}


def assert_within_tolerance(c: Case, inputs, dtype: torch.dtype):
    errs = errors(c, inputs, dtype)
    judged = {k: v for k, v in errs.items()
              if not (k.startswith("d") and c.mode in DISCONTINUOUS_GRADS and dtype == torch.bfloat16)}
    bad = {k: f"{v:.2e}" for k, v in judged.items() if not v <= REL_TOL[dtype]}
    assert not bad, f"relative errors over {REL_TOL[dtype]:.0e}: {bad}"
    return errs


def cases16():
    # H = 64: two 32-unit blocks; H = 70: a short last block; H = 1 and 33 (odd) and proj_size: the fp32 path
    for mode in MODES:
        for packed in (False, True):
            for reverse in (False, True):
                yield Case(mode, 12, 5, 6, 64, packed=packed, reverse=reverse)
        yield Case(mode, 7, 3, 5, 70, bias=False)
        yield Case(mode, 6, 2, 3, 33, packed=True)
    # wide layers use wider unit blocks (here 64 and 128 units), each with a short last one
    yield Case("LSTM", 4, 3, 5, 600)
    yield Case("RNN_TANH", 4, 3, 6, 1100, packed=True, reverse=True)
    yield Case("LSTM", 6, 3, 4, 1)
    yield Case("LSTM", 8, 4, 5, 16, proj=6, packed=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("c", list(cases16()), ids=lambda c: c.id)
def test_16bit_against_fp64(c, dtype):
    assert_within_tolerance(c, make_inputs(c), dtype)


def nn_errors(mode: str, inputs, packed: bool, batch_sizes, dtype: torch.dtype):
    """torch.nn's relative errors in `dtype` against its own fp64, same inputs and cotangents as errors()."""
    c_in = inputs["c0"]
    I, H = inputs["w_ih"].shape[1], inputs["w_hh"].shape[1]

    def run(dt):
        m = nn_module(mode, I, H, 0, True, False).to(inputs["x"].device, dt)
        with torch.no_grad():
            for n, k in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                         ("bias_hh_l0", "b_hh")):
                getattr(m, n).copy_(inputs[k])
        x = inputs["x"].detach().to(dt).requires_grad_()
        h0 = inputs["h0"].detach().to(dt).unsqueeze(0).requires_grad_()
        leaves = [x, h0]
        hx = h0
        if mode == "LSTM":
            c0 = c_in.detach().to(dt).unsqueeze(0).requires_grad_()
            leaves.append(c0)
            hx = (h0, c0)
        seq = torch.nn.utils.rnn.PackedSequence(x, batch_sizes) if packed else x.view(-1, h0.shape[1], I)
        out, hn = m(seq, hx)
        y = out.data if packed else out.reshape(-1, H)
        outs = [y] + [s[0] for s in (hn if mode == "LSTM" else (hn,))]
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, dt)).sum() for o in outs)
        params = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
        grads = torch.autograd.grad(loss, leaves + params)
        names = ["y", "h_n", "c_n"][: len(outs)] + ["dx", "dh0", "dc0"][: len(leaves)]
        names += ["dw_ih", "dw_hh", "db_ih", "db_hh"]
        return dict(zip(names, [o.detach() for o in outs] + list(grads)))

    want, got = run(torch.float64), run(dtype)
    return {k: rel_err(got[k], want[k]) for k in want}


def assert_no_worse_than_torch_nn(mode: str, packed: bool, dtype: torch.dtype, device: str = "cpu"):
    """Every output and gradient is at most NN_FACTOR times as far from fp64 as torch.nn's in the same dtype on
    the same device (with a floor of one rounding, 2^-8 / 2^-11, where torch.nn happens to be exact); on the CPU
    also within REL_TOL, on a GPU judged against torch.nn's error alone (issue 22's measure).
    Discontinuous gradients (one unit rounding across a ReLU's kink moves a whole row) are compared by their mean
    over six inputs."""
    seeds = range(6) if mode in DISCONTINUOUS_GRADS and dtype == torch.bfloat16 else range(1)
    ours, theirs = {}, {}
    for seed in seeds:
        c = Case(mode, 20, 6, 16, 64, packed=packed, seed=seed)
        inputs = {k: v.to(device) if k != "batch_sizes" and v is not None else v for k, v in make_inputs(c).items()}
        mine = assert_within_tolerance(c, inputs, dtype) if device == "cpu" else errors(c, inputs, dtype)
        for acc, errs in ((ours, mine),
                          (theirs, nn_errors(mode, inputs, packed, inputs["batch_sizes"], dtype))):
            for k, v in errs.items():
                acc[k] = acc.get(k, 0.0) + v / len(seeds)
    floor = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ours.keys() == theirs.keys()
    worse = {k: f"{ours[k]:.2e} vs torch.nn {theirs[k]:.2e}" for k in ours
             if ours[k] > NN_FACTOR * max(theirs[k], floor)}
    assert not worse, worse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_16bit_no_worse_than_torch_nn(mode, packed, dtype):
    assert_no_worse_than_torch_nn(mode, packed, dtype)


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("persistent", ["0", "1"], ids=["per-step", "persistent"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
    @pytest.mark.parametrize("mode", MODES)
    def test_cuda_16bit_no_worse_than_torch_nn(mode, packed, dtype, persistent, monkeypatch):
        """The same on the GPU against cuDNN's 16-bit (torch.nn's fp64 there is its native loop), on the per-step
        path and on the persistent engine (FASTRNN_PERSISTENT=1: its tensor cores on sm_80 and later)."""
        monkeypatch.setenv("FASTRNN_PERSISTENT", persistent)
        assert_no_worse_than_torch_nn(mode, packed, dtype, "cuda")


@pytest.mark.parametrize("c", [Case("RNN_TANH", 3, 2, 4, 1100, packed=True),
                               Case("GRU", 3, 2, 4, 600, reverse=True)], ids=lambda c: c.id)
def test_fp32_wide_unit_blocks(c):
    """fp32 layers wide enough for 128- and 64-unit blocks (with a short last block) against the reference."""
    assert_matches_reference(CPU32, c)


# From 4 rows per step (engine_cpu.cpp's kFuseRows) where the weights fit the L3 (on an Intel CPU: the threads'
# L2s, or from 40 rows, kFuseRowsBeyondL2), the forward computes
# x_t . W_ih^T inside the step, one GEMM per thread where its tiles are small, else block by block (gate by gate
# where a block's weights exceed kSplitBytes), into the saved gates' rows when training and a per-thread tile
# otherwise; below it each thread projects all rows for its columns before the first step, on the same packed
# panels (bf16 with odd I: one fp32 GEMM up front). Packed cases shrink below 4 rows on the way.
def in_step_cases():
    for mode in MODES:
        yield Case(mode, 7, 9, 6, 70, packed=True, reverse=mode != "GRU")
        yield Case(mode, 5, 16, 8, 64, bias=mode != "LSTM")
    yield Case("LSTM", 6, 8, 5, 33)
    yield Case("GRU", 4, 7, 6, 40)
    # weight panels over 256 KiB per unit block run gate by gate: W_ih and W_hh in fp32, W_hh in bf16
    yield Case("LSTM", 3, 9, 600, 600, packed=True)
    yield Case("LSTM", 3, 9, 4, 1100)
    yield Case("LSTM", 2, 64, 600, 600)
    # either side of engine_cpu.cpp's kTrainRows (16 rows: T = 1 on the engine, 15 rows on at::mm in training)
    yield Case("LSTM", 1, 16, 5, 40)
    yield Case("GRU", 3, 5, 6, 40)
    # every step under 4 rows: the all-rows projection, in several 64-row calls (kProjRows)
    yield Case("LSTM", 70, 2, 6, 40, reverse=True)
    yield Case("RNN_RELU", 50, 3, 7, 36, packed=True)
    # a thread's tiles over 64 KiB (engine_cpu.cpp's kGroupBytes): a GEMM per unit block, not one per thread
    yield Case("LSTM", 3, 48, 6, 200)
    yield Case("GRU", 3, 48, 5, 240, packed=True)


@pytest.mark.parametrize("intel", [False, True], ids=["other-cpu-rules", "intel-cpu-rules"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", list(in_step_cases()), ids=lambda c: c.id)
def test_input_projection_in_the_step(c, dtype, intel):
    """Outputs and every gradient against fp64 on two threads, NaN-filled workspaces, backward chunks ending
    inside steps; and the forward without autograd (no gates kept: the x tile) returns what the training one
    does: bit for bit where both run the engine, within the suite's tolerance where training runs at::mm (under
    16 rows) and inference the engine. Under either vendor's rules: the wide cases project in the step under the
    L3 rule and up front under the Intel one below 64 rows."""
    inputs = make_inputs(c)
    with at_least_threads(2), nan_poisoned(CPU64), backward_chunk_rows(10), intel_rules(intel):
        if dtype == torch.float32:
            assert_matches_reference(CPU32, c, {k: v.float() if torch.is_tensor(v) and v.is_floating_point()
                                                else v for k, v in inputs.items()})
        else:
            assert_within_tolerance(c, inputs, dtype)
        args = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            plain = cpp.layer(c.mode, reverse=c.reverse, **args)
        trained = cpp.layer(c.mode, reverse=c.reverse,
                            **{k: v.requires_grad_() if k == "w_ih" else v for k, v in args.items()})
    both_on_engine = rows(c, inputs) >= TRAIN_ROWS
    for name, got, want in zip(("y", "h_n", "c_n"), plain, trained):
        if got is None:
            continue
        if both_on_engine:
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
        else:
            assert_close(got, want.detach(), name)


# Under the default steps rule (this file's fixture lifts it): 16 rows or more over fewer than 8 steps (4 at 64 rows
# a step) train on the per-step path, fp32 and bf16 (computed in fp32) alike; packed and reverse among them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", [Case("LSTM", 1, 32, 5, 40), Case("GRU", 3, 64, 6, 24, packed=True),
                               Case("RNN_TANH", 7, 3, 4, 33, reverse=True)], ids=lambda c: c.id)
def test_short_training_calls_take_the_per_step_path(c, dtype):
    """Outputs and every gradient against fp64 on two threads with NaN-filled workspaces, and fastrnn.explain of a
    module of the case's shape names the per-step path in training for the steps rule."""
    inputs = make_inputs(c)
    with engine_steps(0), at_least_threads(2), nan_poisoned(CPU64):
        if dtype == torch.float32:
            assert_matches_reference(CPU32, c, {k: v.float() if torch.is_tensor(v) and v.is_floating_point()
                                                else v for k, v in inputs.items()})
        else:
            assert_within_tolerance(c, inputs, dtype)
        line = fastrnn.explain(module_of(c), torch.randn(c.T, c.B, c.I)).splitlines()[0]
    inference, _, training = line.partition("; in training (with gradients): ")
    if training:
        assert training.startswith("per step at::mm") and "steps in training" in training, line
    else:  # on an Intel CPU a call of so few steps runs at::mm without gradients too, and the line names that rule
        assert "-> cpp: per step at::mm" in inference and "without gradients (on an Intel CPU)" in inference, line


# Rows (T*B) from which the engine runs a call, engine_cpu.cpp's kTrainRows and kInferRows; off AVX-512 a call
# without gradients starts at kInferRows only where the layer's weights reach kInferBytes. A single row without
# gradients takes it in fp32 from kOneRowBytes of weights.
TRAIN_ROWS, INFER_ROWS, INFER_BYTES, ONE_ROW_BYTES = 16, 2, 1 << 20, 256 << 10


def rows(c: Case, inputs) -> int:
    return inputs["x"].shape[0]


def inference_engine_expected(c: Case, n_rows: int) -> bool:
    avx512 = cpp._lib().build_info()["cpu_isa"].startswith("x86-64-v4")
    weight_bytes = GATES[c.mode] * c.H * (c.I + c.H) * 4
    if n_rows == 1:
        return weight_bytes >= ONE_ROW_BYTES
    return n_rows >= TRAIN_ROWS or (n_rows >= INFER_ROWS and (avx512 or weight_bytes >= INFER_BYTES))


def module_of(c: Case):
    """A one-layer fastrnn module (cpp backend) of the case's mode and sizes, for fastrnn.explain."""
    kind = {"LSTM": "LSTM", "GRU": "GRU"}.get(c.mode, "RNN")
    extra = {} if kind != "RNN" else {"nonlinearity": c.mode[4:].lower()}
    return getattr(fastrnn, kind)(c.I, c.H, bias=c.bias, backend="cpp", **extra)


def mm_calls_without_grad(c: Case, args) -> int:
    """aten::mm calls one layer call without gradients makes: one per step or more on the per-step path, none
    on the engine's (its products run on the brgemm ukernel or in place)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpp.layer(c.mode, reverse=c.reverse, **args)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


# Calls without gradients under 16 rows: one step of two rows, two steps of one row (reading W_hh in place where
# its share is large), packed, reverse, without bias, H = 1, odd H, and one layer whose weights reach 1 MiB (the
# engine on every ISA level); a single row of a small layer stays on at::mm, of 256 KiB and more it takes the
# engine, reading both weights in place (I and H not multiples of 8 among them; packed: one sequence of one step).
def inference_cases():
    for mode in MODES:
        yield Case(mode, 1, 2, 5, 40)
        yield Case(mode, 2, 1, 6, 24, reverse=True)
        yield Case(mode, 5, 3, 4, 33, packed=True, bias=False)
    yield Case("LSTM", 3, 1, 7, 1)
    yield Case("GRU", 4, 3, 9, 37, reverse=True)
    yield Case("LSTM", 4, 2, 160, 300)
    yield Case("GRU", 15, 1, 300, 300)
    yield Case("RNN_TANH", 1, 1, 5, 40)
    yield Case("GRU", 1, 1, 203, 150, reverse=True)
    yield Case("LSTM", 1, 1, 7, 261, packed=True)
    yield Case("RNN_RELU", 1, 1, 300, 250, bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", list(inference_cases()), ids=lambda c: c.id)
def test_inference_engine_under_training_rows(c, dtype):
    """Outputs without gradients against fp64 (fp32: the suite's tolerance, bf16: REL_TOL) on two threads with
    NaN-filled workspaces, and fastrnn.explain of a module of the case's shape names the engine exactly where
    the rule takes it (fp32) and at::mm for the same call in training; the profiler's count of aten::mm calls
    says the call ran the path named."""
    if not cpp._lib().build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    check_inference(c, dtype)


def check_inference(c: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(c)
    with torch.no_grad():
        want = [o for o in reference.layer(c.mode, reverse=c.reverse, **inputs) if o is not None]
        args = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        with at_least_threads(2), nan_poisoned(CPU64):
            got = [o for o in cpp.layer(c.mode, reverse=c.reverse, **args) if o is not None]
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        if dtype == torch.float32:
            assert_close(g, w.to(dtype), name)
        else:
            assert rel_err(g, w) <= REL_TOL[dtype], (name, rel_err(g, w))
    if dtype != torch.float32 or c.packed:
        return
    module = module_of(c)
    line = fastrnn.explain(module, torch.randn(c.T, c.B, c.I)).splitlines()[0]
    inference, _, training = line.partition("; in training (with gradients): ")
    engine = inference_engine_expected(c, rows(c, inputs))
    assert ("fused CPU engine" in inference) == engine, line
    if engine:
        why = "a single row (T*B)" if rows(c, inputs) == 1 else "fewer than 16 rows (T*B) in training"
        assert training.startswith("per step at::mm") and why in training, line
    else:
        assert not training and "per step at::mm" in inference, line
        assert ("a single row" if rows(c, inputs) == 1 else "weights under 1 MiB, not AVX-512") in inference, line
    assert (mm_calls_without_grad(c, args) < c.T) == engine


# One or two rows at B = 1 where W_hh is read in place read W_ih in place too (engine_cpu.cpp's DotWeight::kRowsX),
# with the hook's bar lowered so that small layers take it: every mode, I = 1 (no whole 8-lane vector), I and H
# not multiples of 8, H = 1, packed, reverse, without bias; three rows read only W_hh in place. Off AVX-512 two
# rows take the engine only from 1 MiB of weights: the first case.
def both_in_place_cases():
    yield Case("GRU", 2, 1, 300, 300)
    for mode in MODES:
        yield Case(mode, 2, 1, 13, 70)
    yield Case("LSTM", 2, 1, 1, 40, packed=True, reverse=True)
    yield Case("GRU", 2, 1, 9, 1, bias=False)
    yield Case("RNN_TANH", 3, 1, 21, 19, reverse=True)


@pytest.mark.parametrize("c", list(both_in_place_cases()), ids=lambda c: c.id)
def test_forward_reads_w_ih_in_place_at_one_or_two_rows(c):
    """check_inference's outputs, explain and aten::mm count, and where the engine runs, explain names the
    weights read in place: both at one or two rows, W_hh alone at three."""
    if not cpp._lib().build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    with in_place_share(1):
        check_inference(c, torch.float32)
        line = fastrnn.explain(module_of(c), torch.randn(c.T, c.B, c.I)).splitlines()[0]
    if inference_engine_expected(c, c.T * c.B):
        assert ("W_hh and W_ih in place" in line) == (c.T * c.B <= 2) and "W_hh" in line, line


# From 512 rows per call, off AVX-512 and not under the Intel CPU rules (engine_cpu.cpp's BigProducts,
# kBigProductRows; test_engine_at_each_isa_level runs one such case at each level under both rules), the fp32
# backward's dx and
# weight gradients run on the ukernel: 32-column panels of dgates and of W_ih with a short last one, dx in several
# 512-deep blocks of K = G*H, 64-row blocks of [x | h_prev]^T with one spanning both parts, several chunks,
# h_prev from h0 at the first step of either
# direction (dense) or gathered (packed), GRU's dgh apart from dgx. Elsewhere the same cases run seq.cpp's GEMMs.
def big_product_cases():
    yield Case("LSTM", 40, 13, 6, 150)
    yield Case("GRU", 44, 12, 70, 36, reverse=True)
    yield Case("RNN_TANH", 90, 12, 5, 33, packed=True)
    yield Case("RNN_RELU", 80, 12, 8, 100, packed=True, reverse=True)
    yield Case("GRU", 64, 8, 3, 20, bias=False)


@pytest.mark.parametrize("c", list(big_product_cases()), ids=lambda c: c.id)
def test_fp32_backward_products_on_the_ukernel(c):
    """Outputs and every gradient against the reference on two threads, NaN-filled workspaces, backward chunks
    ending inside steps."""
    with at_least_threads(2), nan_poisoned(CPU64), backward_chunk_rows(100):
        assert_matches_reference(CPU32, c)


# At one row per step (B = 1) in fp32, where a thread's share of W_hh fills half its L2, the forward reads W_hh
# in place (engine_cpu.cpp's DotWeight: dot products over PyTorch's layout, four gates' rows at a time, or four
# neighbouring rows of the one gate) instead of packed panels; the hook lowers that share to 1 byte so small
# layers take it: H = 1 (no whole 8-lane vector), H not a multiple of 8, short last unit blocks, four rows and
# a remainder with one gate, packed (one sequence), reverse, without bias. B = 2 keeps the panels.
def in_place_cases():
    for mode in MODES:
        yield Case(mode, 17, 1, 6, 70)
        yield Case(mode, 16, 1, 5, 37, packed=True, reverse=True)
    yield Case("LSTM", 20, 1, 4, 1)
    yield Case("RNN_RELU", 18, 1, 7, 130, bias=False)
    yield Case("GRU", 16, 1, 9, 200, reverse=True)
    yield Case("LSTM", 9, 2, 5, 40)


@pytest.mark.parametrize("c", list(in_place_cases()), ids=lambda c: c.id)
def test_fp32_forward_reads_w_hh_in_place(c):
    """Outputs and every gradient against the reference on two threads, NaN-filled workspaces; and
    fastrnn.explain of a module of the same shape says the path was taken (only at B = 1)."""
    if not cpp._lib().build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    module = module_of(c)
    with at_least_threads(2), nan_poisoned(CPU64), in_place_share(1):
        assert_matches_reference(CPU32, c)
        line = fastrnn.explain(module, torch.randn(c.T, c.B, c.I)).splitlines()[0]
    assert ("W_hh in place" in line) == (c.B == 1), line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_results_outlive_the_thread_scratch(mode, dtype):
    """The engine reuses its thread's scratch (packed weights, gradient sums) from call to call: what a call
    returns must not live there. Outputs and gradients of one call are unchanged after calls of other sizes
    have rewritten the scratch, and equal a repeat of the same call."""
    def run(c):
        inputs = make_inputs(c)
        args = {k: v.to(dtype).requires_grad_(k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"))
                if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        outs = [o for o in cpp.layer(c.mode, reverse=c.reverse, **args) if o is not None]
        leaves = [v for v in args.values() if torch.is_tensor(v) and v.requires_grad]
        g = torch.Generator().manual_seed(2)
        loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    first = Case(mode, 5, 16, 24, 40)
    with at_least_threads(2):
        kept = run(first)
        copies = [t.clone() for t in kept]
        for other in (Case(mode, 7, 20, 48, 72, packed=True), Case(mode, 3, 18, 8, 24, reverse=True)):
            run(other)
        for k, c in zip(kept, copies):
            torch.testing.assert_close(k, c, rtol=0, atol=0)
        again = run(first)
    for k, a in zip(kept, again):
        torch.testing.assert_close(k, a, rtol=0, atol=0)


@pytest.mark.parametrize("c", [Case(m, 6, 9, 5, 40, packed=True, reverse=m == "GRU") for m in MODES],
                         ids=lambda c: c.id)
def test_fp32_without_onednn(c):
    """torch.backends.mkldnn.enabled = False: fp32 takes at::mm for the step and the big GEMMs, says so in
    build_info, and still matches the reference."""
    lib = cpp._lib()
    # where torch's oneDNN matmul runs fp32 (it may refuse, e.g. on a CPU without AVX-512) the runtime names it
    before = lib.build_info()["cpu_gemm"]["float32"]
    engines = ["oneDNN matmul (at::mm to 4M multiply-adds with operands to 1 MiB)", "at::mm",
               "oneDNN matmul (at::mm to 32M multiply-adds with operands to 1 MiB, or under 16 rows: the Intel CPU rules)"]
    assert before.endswith(tuple(f"dx and weight gradients: {e}" for e in engines) + tuple(
        f"dx and weight gradients: the brgemm ukernel from 512 rows (fewer: {e})" for e in engines)), before
    # flags() would also reset oneDNN's TF32 switch, which warns on a torch without Intel GPU support
    torch.backends.mkldnn.enabled = False
    try:
        assert lib.build_info()["cpu_gemm"]["float32"] == (
            "at::mm per step + pointwise cell; dx and weight gradients: at::mm")
        with nan_poisoned(CPU64), backward_chunk_rows(10):
            assert_matches_reference(CPU32, c)
    finally:
        torch.backends.mkldnn.enabled = True
    assert lib.build_info()["cpu_gemm"]["float32"] == before


def test_products_of_few_rows_take_at_mm_on_an_intel_cpu():
    """Under the Intel CPU rules a backward's products of fewer than 16 rows (here one step of one row) run on
    at::mm, which the profiler records, where the other rules send those with an operand over 1 MiB (dW_hh of
    H = 512) to oneDNN's matmul, which it does not; either way the gradients match the float64 reference."""
    if "oneDNN" not in cpp._lib().build_info()["cpu_gemm"]["float32"]:
        pytest.skip("torch's oneDNN matmul does not run fp32 here")
    c = Case("GRU", 1, 1, 65, 512)
    products = {}
    for intel in (False, True):
        with intel_rules(intel), torch.profiler.profile() as prof:
            assert_matches_reference(CPU32, c)
        products[intel] = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_",
                                                                                  "aten::addmm", "aten::mm_out"))
    assert products[True] > products[False], products


@pytest.mark.parametrize("packed,reverse", [(False, False), (True, False), (True, True)],
                         ids=["dense", "packed", "packed-reverse"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_without_dh0_changes_nothing_else(mode, packed, reverse):
    """layer_bwd(need_dh0=False), as LayerNode asks where h0 takes no gradient, skips the per-step path's product
    that only dh0 needs (the CPU engine held off): dh0 is absent and every other gradient is bit for bit the full
    backward's, for sequences that start at different steps (packed, reverse)."""
    torch.manual_seed(0)
    T, B, I, H = 5, 4, 3, 6
    batch_sizes = torch.tensor([4, 3, 3, 2, 1]) if packed else None
    N = int(batch_sizes.sum()) if packed else T * B
    G, lstm = GATES[mode], mode == "LSTM"
    x, h0, c0 = torch.randn(N, I), torch.randn(B, H), torch.randn(B, H) if lstm else None
    weights = [torch.randn(G * H, I), torch.randn(G * H, H), torch.randn(G * H), torch.randn(G * H)]
    lib = cpp._lib()
    with engine_steps(10**9):
        y, h_n, _, gates, c, hn = lib.layer_fwd(mode, x, batch_sizes, h0, c0, *weights, None, reverse, True)
    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn(B, H) if lstm else None)
    args = (mode, x, batch_sizes, h0, c0, *weights, None, reverse, y, gates, c, hn, *grads, True)
    with engine_steps(10**9):
        full, without = lib.layer_bwd(*args), lib.layer_bwd(*args, need_dh0=False)
    assert full[1] is not None and without[1] is None
    for k in (0, 2, 3, 4, 5, 6, 7):
        assert (full[k] is None and without[k] is None) or torch.equal(full[k], without[k]), NAMES[k]


@pytest.mark.parametrize("mode", MODES)
def test_bf16_nan_poisoned_workspaces_across_chunks(mode):
    c = Case(mode, 9, 4, 6, 64, packed=True, reverse=mode == "GRU")
    with nan_poisoned(CPU64), backward_chunk_rows(6):
        assert_within_tolerance(c, make_inputs(c), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_backward_thread_counts_differ(mode, dtype):
    """The blocked gate layout the forward saves depends on H only: a backward with another thread count (or
    nested in a parallel region, which runs serially) reads it right."""
    c = Case(mode, 10, 8, 5, 200, packed=True)
    inputs = make_inputs(c)
    threads = torch.get_num_threads()
    leaves = {k: inputs[k].detach().to(dtype).requires_grad_() for k in NAMES if inputs[k] is not None}
    args = {k: leaves.get(k, inputs[k]) for k in inputs}
    try:
        torch.set_num_threads(1)
        outs = [o for o in cpp.layer(c.mode, reverse=False, **args) if o is not None]
        torch.set_num_threads(max(2, threads))
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), list(leaves.values()))
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(2, threads))
    try:
        want_outs = [o for o in cpp.layer(c.mode, reverse=False, **args) if o is not None]
        want = torch.autograd.grad(sum(o.float().square().sum() for o in want_outs), list(leaves.values()))
    finally:
        torch.set_num_threads(threads)
    # the same arithmetic in the same order per element: bit-identical
    for g, w in zip(outs + list(grads), want_outs + list(want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_fake_kernels_match_in_16bit(mode, dtype):
    """The saved activations of 16-bit CPU calls are fp32; the meta kernels must say so for torch.compile."""
    c = Case(mode, 4, 3, 4, 8 if dtype == torch.bfloat16 else 5, packed=True)
    inputs = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in make_inputs(c).items()}
    args = (c.mode, inputs["x"], inputs["batch_sizes"], inputs["h0"], inputs["c0"], inputs["w_ih"], inputs["w_hh"],
            inputs["b_ih"], inputs["b_hh"], inputs["w_hr"], False, True)
    torch.library.opcheck(cpp.layer.fwd, args, test_utils=("test_faketensor",))


AUTOCAST_REF = "fp64-only" if nn_lstm_autocast_error() else "torch.nn"


@pytest.mark.parametrize("against", [AUTOCAST_REF])
def test_autocast_module_runs_the_bf16_engine_like_torch_nn(against):
    """fp32 modules under CPU autocast: bf16 outputs where torch.nn gives bf16, close to fp64. Where torch.nn's
    LSTM cannot run under autocast (``fp64-only``: oneDNN lacks bf16 LSTM on this CPU) fastrnn still does, and is
    judged against fp64 alone, within the suite's bf16 bound."""
    import fastrnn

    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 64)
    ours = fastrnn.LSTM.from_torch(ref, backend="cpp")
    x = torch.randn(12, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (h, c) = ours(x)
        want_nn = ref(x)[0] if against == "torch.nn" else None
    with torch.no_grad():
        exact, _ = ref.double()(x.double())
    assert got.dtype == torch.bfloat16
    if want_nn is None:
        assert rel_err(got, exact) <= REL_TOL[torch.bfloat16]
    else:
        assert want_nn.dtype == torch.bfloat16
        assert rel_err(got, exact) <= NN_FACTOR * max(rel_err(want_nn, exact), 2.0**-8)


ISA_LEVELS = ["baseline", "avx2", "avx512"]
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_with_isa(cap: str, body: str) -> subprocess.CompletedProcess:
    """``body`` in a fresh interpreter with FASTRNN_CPU_ISA=cap (the level is fixed per process)."""
    code = f"import sys; sys.path.insert(0, {TESTS!r})\n" + body
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTRNN_CPU_ISA": cap},
                          capture_output=True, text=True, timeout=300)


def own_isa_level() -> int:
    info = cpp._lib().build_info()["cpu_isa"]
    if os.environ.get("FASTRNN_CPU_ISA"):
        pytest.skip(f"FASTRNN_CPU_ISA is set for this run: {info}")
    return 2 if info.startswith("x86-64-v4") else 1 if info.startswith("x86-64-v3") else 0


@pytest.mark.parametrize("cap", ISA_LEVELS)
def test_engine_at_each_isa_level(cap):
    """FASTRNN_CPU_ISA caps the level fastrnn's CPU code runs at (the cell loops' clones, the engine's
    transposes and block sizes), so an AVX-512 machine shows the AVX2 path: build_info names the level and the
    cap, and at that level the engine still matches the reference, in fp32 and bf16, both projection paths,
    short and whole unit blocks, W_hh read in place at one row per step, and a backward long enough for the
    ukernel's dx and weight gradients; and without gradients from two rows where that level's rule says."""
    own = own_isa_level()
    proc = run_with_isa(cap, """
import torch
from fastrnn.ops import cpp
from layer_cases import (Case, Impl, assert_matches_reference, at_least_threads, engine_steps, in_place_share,
                         intel_rules)
from test_cpu_engine import assert_within_tolerance, check_inference, make_inputs
print(cpp._lib().build_info()["cpu_isa"])
with engine_steps(1):  # the rows rules of this level (the steps rule on an Intel CPU: tests/test_explain.py)
    for c in [Case("LSTM", 2, 1, 6, 24), Case("GRU", 3, 4, 60, 300, reverse=True)]:
        check_inference(c, torch.float32)
        check_inference(c, torch.bfloat16)
with at_least_threads(2), in_place_share(1), engine_steps(1):
    for c in [Case("LSTM", 5, 16, 24, 70), Case("GRU", 20, 1, 6, 40, reverse=True),
              Case("RNN_TANH", 4, 9, 8, 100, packed=True), Case("RNN_RELU", 3, 6, 5, 33)]:
        assert_matches_reference(Impl("cpp", "cpu", torch.float32), c)
        assert_within_tolerance(c, make_inputs(c), torch.bfloat16)
    for intel in (False, True):  # over 512 rows: the backward's products on the ukernel off AVX-512 but for Intel
        with intel_rules(intel):
            c = Case("GRU", 44, 12, 7, 36, reverse=True)
            assert_matches_reference(Impl("cpp", "cpu", torch.float32), c)
            assert_within_tolerance(c, make_inputs(c), torch.bfloat16)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = min(own, ISA_LEVELS.index(cap))
    info = proc.stdout.splitlines()[0]
    assert info.startswith(("x86-64 baseline", "x86-64-v3", "x86-64-v4")[want]), info
    assert ("capped by FASTRNN_CPU_ISA=" + cap in info) == (want < own), info


def test_unknown_isa_cap_is_refused():
    """An unknown FASTRNN_CPU_ISA is named, with the accepted values, by build_info and by the first CPU call
    (a RuntimeError, not a silent fallback)."""
    proc = run_with_isa("avx3", """
import torch, fastrnn
from fastrnn.ops import cpp
print(cpp._lib().build_info()["cpu_isa"])
try:
    fastrnn.GRU(4, 8, backend="cpp")(torch.randn(3, 2, 4))
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info, raised = proc.stdout.splitlines()[:2]
    assert "FASTRNN_CPU_ISA='avx3' is not one of avx512, avx2, baseline" in info, info
    assert raised == ("raised: fastrnn: FASTRNN_CPU_ISA must be one of avx512, avx2, baseline (or unset), "
                      "got 'avx3'"), raised
