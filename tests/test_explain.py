"""fastrnn.explain: one line per layer call, naming the backend and the path the call really took.

The cpp lines come from the extension's own decisions (csrc/rnn.cpp layer_path), so each case below puts an
input on both sides of one decision and checks that the line changes with it; the Triton lines come from the
options resolution the call runs (cases under the interpreter only).
"""

import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn import backend as _backend
from layer_cases import engine_steps, exactly_threads, in_place_share, intel_rules
from test_persist import emulated

CPP_REASON = _backend.reason_unavailable("cpp", torch.device("cpu"), torch.float32)
TRITON_REASON = _backend.reason_unavailable("triton", torch.device("cpu"), torch.float32)
needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp: {CPP_REASON}")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton: {TRITON_REASON}")


def lines(module, x, hx=None):
    return fastrnn.explain(module, x, hx).splitlines()


def inference_steps(B: int, weight_bytes: int, intel: bool) -> int:
    """Steps from which a call without gradients takes the CPU engine at batch B (with its rows rule): under the
    Intel CPU rules by B and the layer's fp32 weight bytes (engine_cpu.cpp's kInferSteps...), elsewhere any."""
    if not intel:
        return 1
    return 4 if B >= 16 else 8 if B >= 4 or weight_bytes < 1 << 20 else 16


@needs_cpp
def test_one_line_per_layer_and_direction_in_call_order():
    m = fastrnn.GRU(5, 6, num_layers=2, bidirectional=True, backend="cpp")
    got = lines(m, torch.randn(4, 3, 5))
    assert [ln.split(":")[0] for ln in got] == ["call 0", "call 1", "call 2", "call 3"]
    assert ["reverse" in ln for ln in got] == [False, True, False, True]
    assert "I=5 H=6" in got[0] and "I=12 H=6" in got[2]  # the second layer reads both directions
    assert all("-> cpp:" in ln for ln in got)


@needs_cpp
@pytest.mark.parametrize("intel", [False, True], ids=["other-cpu-rules", "intel-cpu-rules"])
def test_cpu_engine_threshold_and_refusals_named(intel):
    """T*B rows on either side of the engine's thresholds (a call in training from 16 rows and 8 steps, or 4 steps
    of 64 rows, without gradients from 2 rows: on any CPU for a layer of 1 MiB of weights, on an Intel CPU over 4-16
    steps by batch; a single row without gradients from 256 KiB of weights), then a projection and fp64, which it
    refuses."""
    if not fastrnn._C.build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    with engine_steps(1):  # the rows rules first; the steps rules below
        few = lines(fastrnn.LSTM(4, 512, backend="cpp"), torch.randn(5, 3, 4))[0]
        many = lines(fastrnn.LSTM(4, 6, backend="cpp"), torch.randn(8, 4, 4))[0]
    one = lines(fastrnn.LSTM(4, 512, backend="cpp"), torch.randn(1, 1, 4))[0]
    one_small = lines(fastrnn.LSTM(4, 120, backend="cpp"), torch.randn(1, 1, 4))[0]  # 4*120*124*4 < 256 KiB
    inference, _, training = few.partition("; in training (with gradients): ")
    assert "fused CPU engine" in inference, few
    assert training.startswith("per step at::mm") and "fewer than 16 rows (T*B) in training" in training, few
    assert "fused CPU engine" in many and "in training" not in many, many
    one_inference, _, one_training = one.partition("; in training (with gradients): ")
    assert "fused CPU engine" in one_inference and "W_hh and W_ih in place" in one_inference, one
    assert one_training.startswith("per step at::mm") and "a single row (T*B))" in one_training, one
    assert "per step at::mm" in one_small and "a single row (T*B) of weights under 256 KiB" in one_small, one_small
    assert "in training" not in one_small, one_small
    # training from 8 steps of 16 rows, or 4 steps of 64 rows a step: one step of a cell (T = 1) stays on at::mm;
    # without gradients under the Intel CPU rules from 8 steps (16 below batch 4 from 1 MiB of weights), 4 from
    # batch 16, under the others from the rows alone
    with intel_rules(intel):
        said = fastrnn._C.build_info()["cpu_engine"]
        for H, T, B in ((6, 7, 16), (6, 8, 2), (6, 3, 64), (6, 4, 64), (6, 1, 32), (6, 7, 3), (6, 7, 4), (6, 3, 16),
                        (512, 15, 3), (512, 16, 3), (512, 8, 4)):
            line = lines(fastrnn.LSTM(4, H, backend="cpp"), torch.randn(T, B, 4))[0]
            inference, _, training = line.partition("; in training (with gradients): ")
            steps, train = inference_steps(B, 4 * H * (4 + H) * 4, intel), 4 if B >= 64 else 8
            assert ("fused CPU engine" in inference) == (T >= steps), line
            if T < steps:
                assert f"fewer than {steps} steps at batch {B} without gradients" in inference, line
            if T * B < 16:
                assert "fewer than 16 rows (T*B) in training" in training, line
            elif (T >= train) == (T >= steps):
                assert not training, line
            elif T >= train:
                assert "fused CPU engine" in training, line
            else:
                assert training.startswith("per step at::mm") and f"fewer than {train} steps in training" in training
        cell = lines(fastrnn.GRUCell(4, 6, backend="cpp"), torch.randn(32, 4))[0]
    assert ("without gradients from 16 steps" in said) == intel and ("whatever the steps" in said) != intel, said
    if intel:
        assert "-> cpp: per step at::mm" in cell and "fewer than 4 steps at batch 32 without gradients" in cell, cell
    else:
        assert "in training (with gradients): per step at::mm" in cell, cell
        assert "fewer than 8 steps in training" in cell, cell
    assert "(CPU engine: proj_size)" in lines(fastrnn.LSTM(4, 6, proj_size=3, backend="cpp"), torch.randn(4, 4, 4))[0]
    assert "per step at::mm" in lines(fastrnn.LSTM(4, 6, backend="cpp").double(), torch.randn(4, 4, 4).double())[0]


@needs_cpp
@pytest.mark.parametrize("intel", [False, True], ids=["other-cpu-rules", "intel-cpu-rules"])
def test_input_projection_place_named(intel):
    """x . W_ih^T inside the step from 4 rows a step where both weights fit the L3, under the Intel CPU rules the
    two threads' L2s (no core's L2 holds half of 11.5 MiB) or from the rows build_info names (kFuseRowsBeyondL2),
    either side of them; else up front (calls of 18 rows or more: the engine at every ISA level)."""
    if not fastrnn._C.build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    engine = fastrnn._C.build_info()["cpu_engine"]
    size, unit = re.search(r"L3 (\d+) (MiB|KiB)", engine).groups()
    l3 = int(size) << (20 if unit == "MiB" else 10)
    with intel_rules(True):  # the rule is named only where it applies
        beyond = int(re.search(r"L2s, from (\d+) where not", fastrnn._C.build_info()["cpu_engine"]).group(1))
    wide, small = fastrnn.LSTM(600, 600, backend="cpp"), fastrnn.LSTM(4, 6, backend="cpp")  # 11.5 MiB, 2 KiB
    batches = (3, 4, 9, beyond - 1, beyond)
    with exactly_threads(2), engine_steps(1), intel_rules(intel):
        got = {(m, B): lines(m, torch.randn(6, B, m.input_size))[0] for m in (wide, small) for B in batches}
    for (m, B), line in got.items():
        in_cache = m is small or (not intel and 4 * 600 * 1200 * 4 <= l3)
        in_step = B >= 4 if in_cache else intel and B >= beyond
        assert "fused CPU engine" in line, line
        assert ("x . W_ih^T in the step" if in_step else "x . W_ih^T up front") in line, line


@needs_cpp
def test_cpu_in_place_recurrent_product_named():
    """One row per step reads W_hh in place where a thread's share of it fills half the L2 (16 MiB over two
    threads, more than any core's L2), not at two rows, not in bf16 on the bf16 engine (where the CPU has no bf16
    ukernel, bf16 is computed in fp32 and reads W_hh in place like fp32), and not where the share is small (1 KiB)
    unless the test hook lowers the bar; W_ih too at one or two rows, not at three."""
    if not fastrnn._C.build_info()["cpu_gemm"]["float32"].startswith("fused"):
        pytest.skip("no CPU engine here (oneDNN's ukernel missing)")
    wide, narrow = fastrnn.LSTM(4, 1024, backend="cpp"), fastrnn.GRU(4, 16, backend="cpp")
    with exactly_threads(2):
        one, two = lines(wide, torch.randn(16, 1, 4))[0], lines(wide, torch.randn(16, 2, 4))[0]
        small = lines(narrow, torch.randn(16, 1, 4))[0]
        with in_place_share(1):
            forced = lines(narrow, torch.randn(16, 1, 4))[0]
    assert "W_hh in place: one row per step" in one, one
    wide_enough = fastrnn.GRU(4, 340, backend="cpp")  # 1.4 MiB of weights: the engine from 2 rows on any CPU
    with exactly_threads(2), in_place_share(1), engine_steps(1):
        x_two, x_three = lines(wide_enough, torch.randn(2, 1, 4))[0], lines(wide_enough, torch.randn(3, 1, 4))[0]
    assert "W_hh and W_ih in place" in x_two and "W_hh in place" in x_three, (x_two, x_three)
    assert "fused CPU engine" in two and "in place" not in two, two
    assert "fused CPU engine" in small and "in place" not in small, small
    assert "W_hh in place" in forced, forced
    half = fastrnn.LSTM(4, 1024, backend="cpp").to(torch.bfloat16)
    with exactly_threads(2):
        bf16 = lines(half, torch.randn(16, 1, 4, dtype=torch.bfloat16))[0]
    widened = "computed in fp32" in bf16
    assert widened == (not fastrnn._C.build_info()["cpu_gemm"]["bfloat16"].startswith("fused")), bf16
    assert ("in place" in bf16) == widened, bf16


@needs_cpp
def test_persistent_engine_named_when_it_runs():
    """Under the CPU emulation of a GPU's limits the cpp backend runs its persistent engine, and says so."""
    m = fastrnn.RNN(4, 6, backend="cpp")
    with emulated(4, 48 * 1024):
        got = lines(m, torch.randn(3, 2, 4))[0]
    assert "persistent engine, one launch per direction" in got
    assert "persistent engine" not in lines(m, torch.randn(3, 2, 4))[0]


@needs_cpp
def test_both_directions_in_one_launch_named():
    """A bidirectional layer's pair shares one launch where half the device's SMs hold each direction's plan, and
    takes a launch per direction where only the whole device does (one SM: none to halve)."""
    m = fastrnn.LSTM(4, 6, bidirectional=True, backend="cpp")
    x = torch.randn(3, 2, 4)
    cells = fastrnn.LSTM(4, 6, bidirectional=True, layer_norm=True, backend="cpp")
    with emulated(4, 48 * 1024):
        pair, ln = lines(m, x), lines(cells, x)
    with emulated(1, 48 * 1024):
        apart = lines(m, x)
    assert len(pair) == 2 and all("persistent engine, both directions in one launch" in p for p in pair)
    assert len(apart) == 2 and all("persistent engine, one launch per direction" in p for p in apart)
    # fastrnn's own cells keep a launch per direction
    assert len(ln) == 2 and all("persistent engine, one launch per direction, the fused row kernel" in p for p in ln)


@needs_cpp
def test_cells_on_the_persistent_engine_named():
    m = fastrnn.GRU(4, 6, layer_norm=True, backend="cpp")
    with emulated(4, 48 * 1024):
        got = lines(m, torch.randn(3, 2, 4))[0]
    assert "persistent engine" in got and "row kernel's rows in it" in got
    assert "persistent engine" not in lines(m, torch.randn(3, 2, 4))[0]


@needs_cpp
def test_cells_and_packed_input_on_cpp():
    m = fastrnn.LSTM(4, 6, layer_norm=True, zoneout=0.1, backend="cpp")
    got = lines(m, pack_sequence([torch.randn(5, 4), torch.randn(2, 4)]))[0]
    assert "T=5 B=2" in got and "packed" in got and "cells: layer_norm, zoneout" in got
    assert "one fused row kernel" in got


@needs_triton
def test_triton_variants_as_resolved():
    x = torch.randn(4, 3, 5)
    plain = lines(fastrnn.GRU(5, 6, backend="triton"), x)[0]
    assert "variant 'seq'" in plain  # W_hh of H = 6 fits in registers
    assert "variant 'step'" in lines(fastrnn.LSTM(5, 6, proj_size=2, backend="triton"), x)[0]
    cells = fastrnn.GRU(5, 6, layer_norm=True, backend="triton")
    assert "fastrnn's cells, variant 'step'" in lines(cells, x)[0]
    cells.backend_options = {"triton": {"variant": "seq"}}
    got = lines(cells, x)[0]
    assert "fastrnn's cells, variant 'seq'" in got and "1 x 1 programs (8 batch rows x 18 product columns" in got
    cells.backend_options = {"triton": {"variant": "persist"}}
    got = lines(cells, x)[0]  # GRU: 18 product columns forward, 6 backward, over 16-column slices
    assert "variant 'persist'" in got and "1 x 2 programs (16 batch rows x 16 product columns each) forward" in got
    assert "1 x 1 programs (16 batch rows x 16 product columns each) backward" in got and "barrier" in got


@needs_triton
def test_triton_persist_says_whether_w_hh_is_held(monkeypatch):
    """The plain persist kernels hold W_hh's slice where it is small enough (resident_chunks: a GRU at H = 40 in
    chunks of 32 rows, forward K = H: 2, backward K = 3H: 4), else stream it; on a GPU, what the launches took
    decides (a resident kernel that spilled streams)."""
    from fastrnn.ops.triton import persist
    m = fastrnn.GRU(5, 40, backend="triton", backend_options={"triton": {"variant": "persist"}})
    x = torch.randn(4, 3, 5)
    got = lines(m, x)[0]
    assert "variant 'persist'" in got and "1 batch tiles x 3 hidden slices" in got
    assert "forward: W_hh held on chip through the time loop (2 chunks)" in got
    assert "backward: W_hh held on chip through the time loop (4 chunks)" in got
    # the forward launch at this shape found its resident kernel spilling (first_clean's record) and streamed
    key = (persist._fwd_persist_kernel.fn.__name__, (2, 0), (3, 40, None, ()), (), x.device)
    monkeypatch.setitem(persist._FIRST_CLEAN, key, None)
    got = lines(m, x)[0]
    assert "forward: W_hh streamed from L2 each step (the resident kernel spilled or did not fit here)" in got
    assert "backward: W_hh held on chip" in got
    monkeypatch.setattr(persist, "RESIDENT_BYTES", 0)
    got = lines(m, x)[0]
    assert got.count("W_hh streamed from L2 each step (its slice exceeds the resident limit)") == 2


@needs_cpp
def test_model_holding_modules_and_nothing_to_explain():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = fastrnn.LSTM(3, 4, backend="cpp"), fastrnn.GRU(4, 2, backend="cpp")

        def forward(self, x):
            return self.b(self.a(x)[0])

    got = lines(Model(), torch.randn(2, 2, 3))
    assert len(got) == 2 and got[0].startswith("call 0: LSTM") and got[1].startswith("call 1: GRU")
    assert fastrnn.explain(nn.Linear(3, 3), torch.randn(2, 3)).startswith("no fastrnn layer call")
    assert not fastrnn.modules.LAYER_CALL_OBSERVERS  # the recorder is gone afterwards
