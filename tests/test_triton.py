"""What only the Triton backend has: kernel variants and their limits, its custom ops, module options,
torch.compile, and the interpreter/compile machinery. Its contract cases are in tests/test_backends.py.

The interpreter replaces jit functions when they are decorated, triton's own included, so
``TRITON_INTERPRET=1`` is set here (and in the conftest) when triton is not imported yet and no GPU is
present. When it already is without it, the interpreter tests, this file's and the harness's, run in a
subprocess started with it. The ahead-of-time spill check and the "no interpreter on CPU" error are subprocess
tests too: each needs the opposite setting.
"""

import contextlib
import functools
import os
import re
import subprocess
import sys
import types

import torch

# the interpreter where no GPU runs the kernels (conftest decides the same way, and first, in a whole-suite run)
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.ops import triton as triton_backend  # noqa: E402
from layer_cases import Case, Impl, assert_matches_reference, fresh_values, make_inputs, run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = triton_backend._host is not None and triton_backend._host.interpreting()
SUBPROCESS_FLAG = "FASTRNN_TRITON_TEST_CHILD"
parent_only = pytest.mark.skipif(os.environ.get(SUBPROCESS_FLAG) == "1", reason="the parent process runs it")
NOT_INTERPRETED = ("kernels imported without the interpreter; see test_interpreter_suite_in_subprocess"
                   if not IN_PROCESS else triton_backend.availability(torch.device("cpu"), torch.float32))
interpreted = pytest.mark.skipif(NOT_INTERPRETED is not None, reason=str(NOT_INTERPRETED))

def _env(interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_script_says_ok(script: str, timeout: float) -> None:
    """Runs ``script`` in a fresh interpreter without TRITON_INTERPRET (the compiled kernels, no GPU needed) from
    the repository root; it passes when it exits cleanly and its last line is ``ok``."""
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(interpret=False),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def triton_impl(dtype, variant):
    return Impl("triton", "cpu", dtype, (("variant", variant),))


@interpreted
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_seq_several_batch_tiles_at_largest_h(dtype, mode):
    c = Case(mode, 3, 18, 3, triton_backend._host.seq_max_h(dtype, mode), packed=True)
    assert_matches_reference(triton_impl(dtype, "seq"), c)


@interpreted
def test_auto_variant_and_limits():
    host = triton_backend._host
    assert host.pick_variant(8, torch.float32, False, "LSTM") == "seq"
    assert host.pick_variant(8, torch.float32, True, "LSTM") == "step"
    for mode in ("LSTM", "GRU"):
        assert host.pick_variant(host.seq_max_h(torch.bfloat16, mode) + 1, torch.bfloat16, False, mode) == "step"
    c = Case("LSTM", 2, 2, 3, 4, proj=2)
    inputs = make_inputs(c, triton_impl(torch.float32, "step"))
    with pytest.raises(ValueError, match="'seq' variant needs no projection"):
        triton_backend.layer("LSTM", reverse=False, variant="seq", **inputs)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        triton_backend.layer("LSTM", reverse=False, cuda_graph=True, **inputs)
    with pytest.raises(ValueError, match="variant must be one of"):
        triton_backend.layer("LSTM", reverse=False, variant="fast", **inputs)
    with pytest.raises(ValueError, match="'persist' variant needs no projection"):
        triton_backend.layer("LSTM", reverse=False, variant="persist", **inputs)


@interpreted
@pytest.mark.parametrize("persistent", ["1", None], ids=["FASTRNN_PERSISTENT=1", "unset"])
def test_auto_variant_takes_persist_on_cuda_only_when_asked(persistent, monkeypatch):
    host = triton_backend._host
    monkeypatch.setattr(host.persist, "device_programs", lambda device: 132)  # an H200's SM count
    if persistent:
        monkeypatch.setenv("FASTRNN_PERSISTENT", persistent)
    else:
        monkeypatch.delenv("FASTRNN_PERSISTENT", raising=False)
    cuda = torch.device("cuda")
    expected = "persist" if persistent else "step"
    assert host.pick_variant(256, torch.float32, False, "LSTM", 64, cuda) == expected
    assert host.pick_variant(8, torch.float32, False, "LSTM", 64, cuda) == "seq"
    assert host.pick_variant(256, torch.float32, True, "LSTM", 64, cuda) == "step"
    # 8 batch tiles x 32 hidden slices would not all be resident on 132 SMs: the barrier could never open
    assert host.pick_variant(1024, torch.float32, False, "LSTM", 256, cuda) == "step"
    assert host.pick_variant(256, torch.float32, False, "LSTM", 64, torch.device("cpu")) == "step"


@pytest.mark.parametrize("max_programs", [1, 4, 132, None])
def test_persist_config_grid_fits_the_device(max_programs):
    """Every tile it returns covers the layer, keeps the whole grid resident and compiles (kernel_report checks
    PERSIST_CONFIGS); it refuses only where even the tallest tile's grid would not be resident."""
    from fastrnn.ops.triton import persist

    tallest = max(c["BB"] for c in persist.PERSIST_CONFIGS)
    for B in (1, 15, 16, 17, 33, 64, 100, 512):
        for H in (1, 16, 17, 40, 256, 1000, 4096):
            cfg = persist.persist_config(B, H, max_programs)
            slices = -(-H // min(c["BH"] for c in persist.PERSIST_CONFIGS))
            if cfg is None:
                assert max_programs is not None and -(-B // tallest) * slices > max_programs, (B, H)
                continue
            assert cfg in persist.PERSIST_CONFIGS
            tiles, n_slices = persist.grid(B, H, cfg)
            assert tiles * cfg["BB"] >= B > (tiles - 1) * cfg["BB"] and n_slices * cfg["BH"] >= H
            assert max_programs is None or tiles * n_slices <= max_programs, (B, H, cfg)


def test_for_release_changes_only_the_keyed_tiles():
    from fastrnn.ops.triton.cells import for_release

    base = ({"BB": 16, "num_warps": 4}, {"BB": 32, "num_warps": 8})
    overrides = {"3.9": {32: {"num_warps": 4, "fwd_stages": 1}}}
    assert for_release(base, overrides, lambda t: t["BB"], "3.8") == base
    got = for_release(base, overrides, lambda t: t["BB"], "3.9")
    assert got == ({"BB": 16, "num_warps": 4}, {"BB": 32, "num_warps": 4, "fwd_stages": 1})
    assert base[1] == {"BB": 32, "num_warps": 8}


# Per release, what a launch takes where that release changed a tile (its kernel report with Triton's own ptxas
# log spilled without the change): the warps of the step kernels at 32 rows x 16 units, of the persist kernels at
# 16 rows streaming W_hh and holding it, the persist forward's stages at 32 rows, the seq kernels' warps at H 64.
RELEASE_TILES = {"3.6": (8, 4, 4, 2, 4), "3.8": (8, 4, 4, 2, 4), "3.9": (4, 8, 4, 1, 8)}


@pytest.mark.parametrize("release", sorted(RELEASE_TILES))
def test_launch_tiles_follow_the_triton_release(release, monkeypatch):
    """step_config, persist_config and seq_config hand a launch their base tiles with the changes of the Triton
    release at hand (kernel_report compiles the same tables, so CI checks those of the release it installs)."""
    from fastrnn.ops.triton import cells, persist, seq, step

    assert step.STEP_CONFIGS == step.configs_for(cells.release())
    assert persist.PERSIST_CONFIGS == persist.configs_for(cells.release())
    monkeypatch.setattr(cells.triton, "__version__", release + ".0")
    monkeypatch.setattr(step, "STEP_CONFIGS", step.configs_for(cells.release()))
    monkeypatch.setattr(persist, "PERSIST_CONFIGS", persist.configs_for(cells.release()))
    rows16 = persist.persist_config(16, 64, None)
    got = (step.step_config(32, 16)["num_warps"], persist.warps(rows16, 0), persist.warps(rows16, 4),
           persist.persist_config(32, 64, None)["fwd_stages"], seq.seq_config(64, torch.bfloat16, "LSTM")["num_warps"])
    assert got == RELEASE_TILES[release]
    # elsewhere the base tiles
    assert step.step_config(64, 64) == step.STEP_TILES[3] and step.step_config(1, 8) == step.STEP_TILES[0]
    assert seq.seq_config(32, torch.bfloat16, "LSTM")["num_warps"] == 4


def record_persist_launches(H: int, T: int, monkeypatch) -> list:
    """The launches of a tanh RNN's persist forward over ``T`` steps of 3 rows at ``H`` units, each as (grid, its
    step span, its keywords, whether its barrier counters were all zero), the kernel replaced by a recorder that
    counts an arrival in each tile's counter as a launch would."""
    from fastrnn.ops.triton import persist

    calls = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                counters = args[-6].view(grid[0], -1)
                calls.append((grid, args[-5:-3], kw, not counters.any()))
                counters[:, 0] += 1

            return launch

    monkeypatch.setattr(persist, "_fwd_persist_kernel", Recorder())
    B = 3
    bs = torch.full((T,), B, dtype=torch.int32)
    off = torch.arange(T, dtype=torch.int64) * B
    xp, h = torch.zeros(T * B, H), torch.zeros(B, H)
    persist.fwd_persist(2, 1, xp, None, torch.zeros(H, H), h, h, bs, off, xp, h, h, h, False, False, False)
    return calls


@interpreted
def test_persist_launch_takes_the_warps_of_what_it_holds(monkeypatch):
    """A launch streaming W_hh (H = 4096: too many chunks to hold) takes the tile's ``streamed_warps`` where a
    release gives it some (Triton 3.9's 16-row tile), one holding W_hh (H = 64) the tile's ``num_warps``."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "PERSIST_CONFIGS", persist.configs_for("3.9"))
    cfg = persist.PERSIST_CONFIGS[0]
    assert cfg["streamed_warps"] != cfg["num_warps"]
    for H, held in ((64, True), (4096, False)):
        launches = record_persist_launches(H, 2, monkeypatch)
        assert launches and all((kw["NK"] > 0) == held for _, _, kw, _ in launches), H
        assert {kw["num_warps"] for _, _, kw, _ in launches} == {cfg["num_warps" if held else "streamed_warps"]}, H


@interpreted
@pytest.mark.parametrize("barrier", [True, False], ids=["barrier", "as-gpu"])
@pytest.mark.parametrize("H, slices", [(8, 1), (40, 3)])
def test_persist_launches_per_step_only_where_programs_would_wait(H, slices, barrier, monkeypatch):
    """In the interpreter (programs run one after another) several hidden slices get one launch per step
    without the barrier; one slice gets one launch for the sequence, with the barrier unless
    persist.INTERPRETED_BARRIER asks for the GPU's compile. Never a cooperative launch here."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "INTERPRETED_BARRIER", barrier)
    T = 5
    calls = record_persist_launches(H, T, monkeypatch)
    assert all(grid == (1, slices) for grid, _, _, _ in calls)
    spans = [span for _, span, _, _ in calls]
    assert spans == ([(k, k + 1) for k in range(T)] if slices > 1 else [(0, T)])
    assert all(kw["SYNC"] == (slices == 1 and barrier) and "launch_cooperative_grid" not in kw
               for _, _, kw, _ in calls)


@interpreted
@pytest.mark.parametrize("limit, spans", [(2, [(0, 2), (2, 4), (4, 5)]), (4, [(0, 4), (4, 5)]), (5, [(0, 5)]),
                                          (1, [(k, k + 1) for k in range(5)])])
def test_persist_launches_keep_barrier_counts_within_int32(limit, spans, monkeypatch):
    """A barrier counter (int32) counts every arrival of its launch: where a sequence's would pass
    persist.MAX_ARRIVALS (2^31 - 1; lowered here) it takes several launches over consecutive steps, each from
    zeroed counters."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "MAX_ARRIVALS", limit)
    calls = record_persist_launches(8, 5, monkeypatch)
    assert [span for _, span, _, _ in calls] == spans
    assert all(zeroed and kw["SYNC"] for _, _, kw, zeroed in calls)


@interpreted
@pytest.mark.parametrize("c", [Case("LSTM", 4, 3, 3, 16, packed=True, reverse=True), Case("GRU", 3, 2, 3, 13),
                               Case("RNN_TANH", 3, 3, 2, 16, packed=True), Case("RNN_RELU", 2, 2, 3, 9, bias=False)],
                         ids=lambda c: c.id)
def test_persist_one_slice_as_a_gpu_compiles_it(c, monkeypatch):
    """A grid of one hidden slice compiled as on a GPU, without the barrier (persist.INTERPRETED_BARRIER off: plain
    loads of the previous step, the forward's loop over K pipelined), resident and streamed W_hh: outputs and every
    gradient match the reference."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "INTERPRETED_BARRIER", False)
    assert persist.grid(c.B, c.H, persist.persist_config(c.B, c.H, None))[1] == 1
    assert not persist.compiles_barrier(1) and persist.compiles_barrier(2)
    assert_matches_reference(triton_impl(torch.float32, "persist"), c)
    monkeypatch.setattr(persist, "RESIDENT_BYTES", 0)
    assert_matches_reference(triton_impl(torch.float32, "persist"), c)


@interpreted
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_persist_split_into_launches_matches_reference(mode, monkeypatch):
    """The persist kernels' forward and backward over a sequence split into launches of two steps (the state and
    gate gradients passed between them in global memory, packed and reversed) against the reference."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "MAX_ARRIVALS", 2)
    assert_matches_reference(triton_impl(torch.float32, "persist"), Case(mode, 5, 3, 3, 8, packed=True, reverse=True))


if IN_PROCESS:
    import triton
    import triton.language as tl

    from fastrnn.ops.triton.persist import _barrier

    @triton.jit
    def _arrive_once(p_sync, SYNC: tl.constexpr):
        _barrier(p_sync, 1, SYNC)


@interpreted
def test_persist_barrier_counts_each_tile_on_a_line_of_its_own():
    """Three batch tiles' programs meet at the barrier compiled in, each at its own tile's counter of
    barrier_counters', 128 bytes apart; nothing else there is touched."""
    from fastrnn.ops.triton import persist

    counters = persist.barrier_counters(3, torch.device("cpu"))
    _arrive_once[(3, 1)](counters, SYNC=True)
    lines = counters.view(3, 128 // counters.element_size())
    assert lines[:, 0].tolist() == [1, 1, 1] and not lines[:, 1:].any(), lines


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", [Case("LSTM", 3, 3, 3, 40, packed=True, reverse=True), Case("LSTM", 4, 3, 3, 16),
                               Case("GRU", 3, 2, 3, 40),
                               Case("RNN_TANH", 3, 3, 2, 36, packed=True), Case("RNN_RELU", 2, 2, 3, 33, bias=False)],
                         ids=lambda c: c.id)
def test_persist_resident_w_hh_is_the_streamed_one(c, dtype, monkeypatch):
    """The persist kernels holding their W_hh slice through the time loop (step.resident_w) compute what they compute
    reading it every step, bit for bit (the same chunks of K in the same order), outputs and every gradient: several
    hidden slices (launched per step here), one slice (the whole sequence in one launch, its W_hh held over every
    step), two or more chunks of K (forward H, backward G*H), a ragged last chunk."""
    from fastrnn.ops.triton import persist

    taken = []
    chunks = persist.resident_chunks
    monkeypatch.setattr(persist, "resident_chunks", lambda *a: taken.append(chunks(*a)) or taken[-1])
    inputs = make_inputs(c, Impl("triton", "cpu", dtype))
    layer = functools.partial(triton_backend.layer, variant="persist")
    resident = run(layer, c, inputs)
    monkeypatch.setattr(persist, "RESIDENT_BYTES", 0)
    streamed = run(layer, c, inputs)
    assert len(taken) == 4 and taken[1] > 1 and (taken[0] > 1 or c.H <= 32) and taken[2:] == [0, 0], taken
    (outs, grads), (outs_s, grads_s) = resident, streamed
    assert len(outs) == len(outs_s) and grads.keys() == grads_s.keys()
    for a, b in zip(outs + list(grads.values()), outs_s + list(grads_s.values())):
        assert torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_persist_streamed_forward_whose_programs_meet(mode, monkeypatch):
    """A grid of one hidden slice (a 64-unit tile here) runs the whole sequence in one launch, its programs meeting
    at the barrier, streaming W_hh: the forward's loop over K is not pipelined there, the gated cells' in
    half-width chunks (step.fwd_step_tile), over H = 40 three chunks with a ragged last one (two for the tanh
    RNN); outputs and every gradient match the reference."""
    from fastrnn.ops.triton import persist

    monkeypatch.setattr(persist, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(persist, "PERSIST_CONFIGS", tuple(dict(t, BH=64) for t in persist.PERSIST_CONFIGS))
    c = Case(mode, 3, 3, 3, 40)
    assert persist.grid(c.B, c.H, persist.persist_config(c.B, c.H, None))[1] == 1
    assert_matches_reference(triton_impl(torch.float32, "persist"), c)


@interpreted
def test_custom_op_registration():
    t = make_inputs(Case("RNN_TANH", 2, 2, 3, 4), triton_impl(torch.float32, "seq"))
    t = {k: v if v is None or v.dtype == torch.int64 else v.requires_grad_() for k, v in t.items()}
    args = ("RNN_TANH", t["x"], None, t["h0"], None, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], None, False,
            "seq", False, True)
    torch.library.opcheck(triton_backend.layer.fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq", "persist"])
def test_module_end_to_end_with_backend_options(variant, monkeypatch):
    """A module passes ``backend_options`` to the backend that runs it (and only to that one)."""
    ref = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    fast = fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, backend="triton",
                        backend_options={"triton": {"variant": variant}, "cpp": {"unused": 1}})
    seen = []
    forward = triton_backend._host.forward
    monkeypatch.setattr(triton_backend._host, "forward",
                        lambda a, opts, save: seen.append(opts) or forward(a, opts, save))
    fast.load_state_dict(ref.state_dict())
    seqs = [torch.randn(n, 4) for n in (3, 2, 2)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs)
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = fast(packed), ref(packed)
    for a, b in ((y.data, y_ref.data), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.data.sum() + h.sum(), list(fast.parameters()))
    g_ref = torch.autograd.grad(y_ref.data.sum() + h_ref.sum(), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert seen and all(opts == (variant, False) for opts in seen), seen


@interpreted
@pytest.mark.parametrize("c", [Case("LSTM", 4, 3, 3, 5, proj=3, packed=True, reverse=True),
                               Case("GRU", 4, 3, 3, 5, packed=True), Case("RNN_RELU", 3, 2, 3, 4, bias=False)],
                         ids=lambda c: c.id)
def test_graph_replays_read_every_input_afresh(emulated_cuda_graphs, c):
    """The step loop replayed as ``cuda_graph=True`` replays it (emulated on the CPU: conftest's
    ``emulated_cuda_graphs``): calls of one shape with fresh inputs each give the loop's own outputs and
    gradients bit for bit, from one forward and one backward capture."""
    first = make_inputs(c, Impl("triton", "cpu", torch.float32))
    for seed in range(3):
        inputs = fresh_values(first, seed) if seed else first
        want = run(functools.partial(triton_backend.layer, variant="step", cuda_graph=False), c, inputs)
        got = run(functools.partial(triton_backend.layer, variant="step", cuda_graph=True), c, inputs)
        for a, b in zip(got[0], want[0]):
            assert torch.equal(a, b)
        for name in want[1]:
            assert torch.equal(got[1][name], want[1][name]), name
        # captured on the shape's second call, replayed on the third
        assert [k[0][0] for k in emulated_cuda_graphs] == (["fwd", "bwd"] if seed else [])


@interpreted
def test_graph_replays_keep_inference_mode_apart(emulated_cuda_graphs):
    """Calls of one shape under ``torch.inference_mode`` and then under ``torch.no_grad`` replay graphs of their
    own (input copies made in inference mode refuse a later call's ``copy_`` outside it) and give the loop's
    outputs."""
    c = Case("GRU", 3, 2, 3, 4)
    layer = functools.partial(triton_backend.layer, variant="step")
    inputs = make_inputs(c, Impl("triton", "cpu", torch.float32))
    for mode in (torch.inference_mode, torch.inference_mode, torch.no_grad, torch.no_grad, torch.no_grad):
        with mode():
            want = [o for o in layer(c.mode, reverse=False, cuda_graph=False, **inputs) if o is not None]
            got = [o for o in layer(c.mode, reverse=False, cuda_graph=True, **inputs) if o is not None]
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert [(k[0][0], k[1]) for k in emulated_cuda_graphs] == [("fwd", True), ("fwd", False)]


def test_graph_capture_checks_only_its_own_thread(monkeypatch):
    """fastrnn's own capture (host._capture, torch's CUDA calls stood in for on the CPU) warms the loop up on a side
    stream and then captures it in "thread_local" mode, so that another thread's allocations meanwhile (a
    DataLoader's pinning thread) do not fail; replays give the captured call's outputs."""
    host = triton_backend._host
    events = []

    class Stream:
        def wait_stream(self, other):
            events.append("wait")

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def on(stream):
        events.append("side")
        yield

    @contextlib.contextmanager
    def graph(g, **kw):
        events.append(("capture", kw))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    x = torch.randn(3)
    replay = host._capture(lambda t: events.append("loop") or [t * 2], [x])
    assert torch.equal(replay()[0], x * 2)
    assert events == ["wait", "side", "loop", "wait", ("capture", {"capture_error_mode": "thread_local"}), "loop",
                      "replay"], events


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("mode", ["LSTM", "GRU"])
    def test_cuda_graph_replays_match_and_the_cache_is_bounded(mode, monkeypatch):
        """``cuda_graph=True`` gives the plain loop's results on every replay, with new inputs each call,
        and keeps at most ``GRAPH_CACHE_SIZE`` captured shapes."""
        host = triton_backend._host
        monkeypatch.setattr(host, "GRAPH_CACHE_SIZE", 2)
        monkeypatch.setattr(host, "_GRAPHS", type(host._GRAPHS)())
        monkeypatch.setattr(host, "_SEEN", type(host._SEEN)())
        plain = Impl("triton", "cuda", torch.float32, (("cuda_graph", False), ("variant", "step")))
        graphed = Impl("triton", "cuda", torch.float32, (("cuda_graph", True), ("variant", "step")))
        for T, seed in ((5, 0), (5, 1), (7, 2), (9, 3), (5, 4)):
            c = Case(mode, T, 4, 3, 40, proj=3 if mode == "LSTM" else 0, packed=True, seed=seed)
            inputs = make_inputs(c, plain)
            for call in range(3):  # a shape is captured on its second call and replayed from its third
                given = fresh_values(inputs, call) if call else inputs
                (outs, grads), (g_outs, g_grads) = run(plain.layer, c, given), run(graphed.layer, c, given)
                for a, b in zip(outs + list(grads.values()), g_outs + list(g_grads.values())):
                    torch.testing.assert_close(b, a)
            assert len(host._GRAPHS) <= 2

    @pytest.mark.cuda
    def test_cuda_graph_of_one_shape_in_another_dtype_is_its_own(monkeypatch):
        """Calls of one shape in several dtypes, one after another: each replays a graph of its own dtype (a
        graph captured for fp16 and replayed with fp32 inputs would round them to fp16)."""
        host = triton_backend._host
        monkeypatch.setattr(host, "_GRAPHS", type(host._GRAPHS)())
        monkeypatch.setattr(host, "_SEEN", type(host._SEEN)())
        c = Case("LSTM", 6, 4, 3, 40, seed=5)
        for dt in (torch.float16, torch.float32, torch.bfloat16, torch.float32):
            plain = Impl("triton", "cuda", dt, (("cuda_graph", False), ("variant", "step")))
            graphed = Impl("triton", "cuda", dt, (("cuda_graph", True), ("variant", "step")))
            inputs = make_inputs(c, plain)
            outs, grads = run(plain.layer, c, inputs)
            for _ in range(2):  # a shape is captured on its second call
                g_outs, g_grads = run(graphed.layer, c, inputs)
                for a, b in zip(outs + list(grads.values()), g_outs + list(g_grads.values())):
                    assert b.dtype == a.dtype == dt
                    torch.testing.assert_close(b, a)


@interpreted
def test_torch_compile_fullgraph():
    # The custom ops' fake implementations must let dynamo/AOTAutograd trace the layer without a break.
    ref = torch.nn.GRU(4, 6)
    fast = fastrnn.GRU(4, 6, backend="triton")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4)
    y, h = torch.compile(fast, backend="aot_eager", fullgraph=True)(x)
    y_ref, h_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), list(fast.parameters()))
    g_ref = torch.autograd.grad(y_ref.sum(), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def passed_count(pytest_output: str) -> int:
    """Tests a child pytest run passed, from its summary line; a run whose every test skipped (say, the
    interpreter was not active after all) passed none, and its parent must not pass either."""
    summary = [line for line in pytest_output.splitlines() if re.search(r" in [\d.]+s", line)]
    m = re.search(r"(\d+) passed", summary[-1]) if summary else None
    return int(m.group(1)) if m else 0


@parent_only
@pytest.mark.parametrize("output, expected", [
    ("....\n4 passed, 2 skipped in 3.10s\n", 4),
    ("ssss\n4 skipped in 0.52s\n", 0),
    ("\nno tests ran in 0.01s\n", 0),
    ("1 failed, 12 passed in 9.00s (0:00:09)\n", 12),
])
def test_passed_count_reads_the_summary(output, expected):
    assert passed_count(output) == expected


@pytest.mark.skipif(IN_PROCESS or os.environ.get(SUBPROCESS_FLAG) == "1", reason="kernels run in process")
def test_interpreter_suite_in_subprocess():
    if triton_backend._host is not None and triton_backend._host.INTERPRETER_PROBLEM is not None:
        pytest.skip(triton_backend._host.INTERPRETER_PROBLEM)
    env = dict(_env(interpret=True), **{SUBPROCESS_FLAG: "1"})
    # the Triton cases of the shared harness too, on the CPU (a GPU, if any, runs them in the parent)
    harness = os.path.join(os.path.dirname(__file__), "test_backends.py")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, harness,
                          "-k", "triton and not cuda"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert passed_count(res.stdout) > 0, "the child ran no test:\n" + res.stdout[-4000:]


@pytest.mark.skipif(triton_backend._host is None, reason="triton cannot be imported")
@pytest.mark.parametrize("version, numpy_refuses, names_it", [
    ("3.6.0", True, True), ("3.6.0", False, False), ("3.7.0", True, False), ("3.10.1", True, False),
])
def test_interpreter_problem_named_with_both_versions(version, numpy_refuses, names_it, monkeypatch):
    from fastrnn.ops.triton import cells

    class OneElement:
        def __int__(self):
            if numpy_refuses:
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return 1

    monkeypatch.setattr(cells.triton, "__version__", version)
    monkeypatch.setattr(cells, "numpy", types.SimpleNamespace(ones=lambda n: OneElement(), __version__="2.4.1"))
    why = cells.interpreter_problem()
    if names_it:
        assert why is not None and "Triton 3.6.0" in why and "NumPy 2.4.1" in why and "triton>=3.7" in why, why
    else:
        assert why is None, why


@parent_only
def test_cpu_without_interpreter_refuses_clearly():
    script = (
        "import torch, fastrnn\n"
        "from fastrnn.ops import triton as tb\n"
        "why = tb.availability(torch.device('cpu'), torch.float32)\n"
        "assert why == tb.CPU_REASON, why\n"
        "assert tb.availability(torch.device('cpu'), torch.int32) is not None\n"
        "for call in (lambda: tb.layer('GRU', torch.randn(4, 3), None, torch.randn(2, 5), None, torch.randn(15, 3),\n"
        "                              torch.randn(15, 5), None, None, None, False),\n"
        "             lambda: fastrnn.LSTM(3, 5, backend='triton')(torch.randn(2, 1, 3))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        assert 'Triton kernels need a CUDA GPU; set TRITON_INTERPRET=1' in str(exc), str(exc)\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    assert_script_says_ok(script, timeout=300)


@parent_only
def test_report_reads_what_tritons_own_ptxas_says():
    """kernel_report's ptxas run takes the flags Triton passes its own (``--fmad=false``, as fastrnn compiles without
    fp fusion; ``-v`` for the counts), and the two runs (``--triton-log``: Triton's log) give the same registers,
    stack and spills for a step kernel and a persist kernel holding W_hh, on sm_80 and sm_90."""
    script = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "import kernel_report as kr\n"
        "for cc in kr.ARCHS:\n"
        "    flags = kr.triton_ptxas_flags(cc)\n"
        "    assert '--fmad=false' in flags and '-v' in flags and not kr.FP_FUSION, flags\n"
        "specs = kr.kernel_specs(True)\n"
        "picked = [next(s for s in specs if s['kernel'] == 'step_bwd' and s['dtype'] == kr.torch.bfloat16),\n"
        "          next(s for s in specs if s['kernel'] == 'persist_fwd' and s['const']['NK'])]\n"
        "for spec in picked:\n"
        "    for cc in kr.ARCHS:\n"
        "        ours, theirs = kr.compile_one(spec, cc), kr.compile_one(spec, cc, triton_log=True)\n"
        "        keys = ('registers', 'stack', 'spill_stores', 'spill_loads', 'smem')\n"
        "        same = [ours[k] for k in keys] == [theirs[k] for k in keys]\n"
        "        assert ours['registers'] > 0 and same, (ours, theirs)\n"
        "print('ok')\n"
    )
    assert_script_says_ok(script, timeout=600)


@parent_only
def test_every_config_compiles_without_spills():
    # Every tile configuration the launch heuristics can pick, for sm_80 and sm_90 (see kernel_report).
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_report.py"), "--quick",
                          "--check", "--no-cuda", "--jobs", "2"], cwd=ROOT, env=_env(interpret=False),
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| step_", "| seq_", "| persist_", "| ext_"))]
    kernels = {line.split("|")[1].strip() for line in rows}
    assert kernels == {"step_fwd", "step_bwd", "step_bwd_proj", "seq_fwd", "seq_bwd", "persist_fwd", "persist_bwd",
                       "ext_fwd", "ext_bwd", "ext_bwd_proj", "ext_ln_rows", "ext_ln_rows_bwd", "ext_seq_fwd",
                       "ext_seq_bwd", "ext_persist_fwd", "ext_persist_bwd"}, kernels
    # the report names the assembler it used per target, and its CUDA version
    tools = re.findall(r"^- sm_(\d+)a?: `[^`]*ptxas[^`]*`, CUDA \d+\.\d+$", res.stdout, re.M)
    assert sorted(tools) == ["80", "90"], res.stdout[:1500]
