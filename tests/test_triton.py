"""Triton backend: every kernel run under the Triton interpreter on CPU and compared with the reference.

The interpreter replaces jit functions when they are decorated, triton's own included, so
``TRITON_INTERPRET=1`` is set here when triton is not imported yet. When it already is without it (the
conftest's ``import fastrnn`` loads triton), the interpreter tests run in a subprocess started with it.
The ahead-of-time spill check and the "no interpreter on CPU" error are subprocess tests too: each needs
the opposite setting.
"""

import os
import re
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.ops import GATES, reference  # noqa: E402
from fastrnn.ops import triton as triton_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = triton_backend._host is not None and triton_backend._host.interpreting()
SUBPROCESS_FLAG = "FASTRNN_TRITON_TEST_CHILD"
parent_only = pytest.mark.skipif(os.environ.get(SUBPROCESS_FLAG) == "1", reason="the parent process runs it")
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="kernels imported without the interpreter; see "
                                 "test_interpreter_suite_in_subprocess")

# Relative to the largest reference magnitude of each compared tensor: bf16/fp16 round h to 8/11 bits for
# the recurrent product, fp32 differs from the reference only in summation order.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _env(interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_inputs(mode, T, B, I, H, dtype, proj=0, bias=True, packed=None):
    """Random layer inputs; ``packed`` is a non-increasing list of batch sizes (overrides T, B rows)."""
    G, HO = GATES[mode], proj or H
    N = sum(packed) if packed else T * B
    scale = H ** -0.5
    t = {
        "x": torch.randn(N, I),
        "h0": torch.randn(B, HO),
        "c0": torch.randn(B, H) if mode == "LSTM" else None,
        "w_ih": torch.randn(G * H, I) * scale,
        "w_hh": torch.randn(G * H, HO) * scale,
        "b_ih": torch.randn(G * H) * 0.5 if bias else None,
        "b_hh": torch.randn(G * H) * 0.5 if bias else None,
        "w_hr": torch.randn(HO, H) * scale if proj else None,
    }
    t = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in t.items()}
    batch_sizes = torch.tensor(packed, dtype=torch.int64) if packed else None
    return t, batch_sizes


ORDER = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def run_layer(fn, mode, t, batch_sizes, reverse, **kw):
    args = [t[k] for k in ORDER]
    return fn(mode, args[0], batch_sizes, *args[1:], reverse, **kw)


def check(mode, T, B, I, H, dtype=torch.float32, variant="step", proj=0, bias=True, packed=None,
          reverse=False):
    t, bs = make_inputs(mode, T, B, I, H, dtype, proj, bias, packed)
    out = run_layer(triton_backend.layer, mode, t, bs, reverse, variant=variant)
    ref = run_layer(reference.layer, mode, t, bs, reverse)
    assert (out[2] is None) == (mode != "LSTM")
    names = [k for k in ORDER if t[k] is not None]
    outs = [o for o in out if o is not None]
    refs = [r for r in ref if r is not None]
    weights = [torch.randn(r.shape) for r in refs]
    loss = lambda os_: sum((o.float() * w).sum() for o, w in zip(os_, weights))  # noqa: E731
    grads = torch.autograd.grad(loss(outs), [t[k] for k in names])
    ref_grads = torch.autograd.grad(loss(refs), [t[k] for k in names])
    for label, a, b in [*zip(("y", "h_n", "c_n"), outs, refs), *zip(names, grads, ref_grads)]:
        assert a.dtype == b.dtype and a.shape == b.shape, label
        tol = TOL[dtype] * max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=tol, msg=lambda m: f"{label}: {m}")


MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq"])
@pytest.mark.parametrize("mode", MODES)
def test_dense(mode, variant):
    check(mode, T=3, B=3, I=5, H=7, variant=variant)


@interpreted
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", ["step", "seq"])
@pytest.mark.parametrize("mode", MODES)
def test_packed(mode, variant, reverse):
    check(mode, T=4, B=3, I=4, H=5, variant=variant, packed=[3, 3, 2, 1], reverse=reverse)


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_single_row_single_step(mode, variant):
    check(mode, T=1, B=1, I=3, H=6, variant=variant)


@interpreted
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_step_several_tiles(mode):
    # 40 rows -> two 32-row tiles, shrinking to one; H=40 -> two hidden slices and two reduction chunks.
    check(mode, T=3, B=40, I=3, H=40, variant="step", packed=[40, 33, 17], reverse=True)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seq_several_batch_tiles_at_largest_h(dtype):
    H = triton_backend._host.SEQ_MAX_H[dtype]
    check("LSTM", T=3, B=18, I=3, H=H, dtype=dtype, variant="seq", packed=[18, 17, 2])


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_no_bias(mode, variant):
    check(mode, T=2, B=2, I=3, H=5, variant=variant, bias=False)


@interpreted
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lstm_projection(dtype, reverse):
    check("LSTM", T=3, B=3, I=4, H=6, dtype=dtype, proj=3, packed=[3, 2, 1], reverse=reverse)


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq"])
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(mode, variant):
    check(mode, T=3, B=2, I=4, H=9, dtype=torch.bfloat16, variant=variant, packed=[2, 2, 1])


@interpreted
@pytest.mark.parametrize("variant", ["step", "seq"])
def test_float16(variant):
    check("GRU", T=2, B=2, I=4, H=9, dtype=torch.float16, variant=variant, reverse=True)


@interpreted
def test_auto_variant_and_limits():
    common = triton_backend._host
    assert common.pick_variant(8, torch.float32, False) == "seq"
    assert common.pick_variant(8, torch.float32, True) == "step"
    assert common.pick_variant(common.SEQ_MAX_H[torch.float32] + 1, torch.float32, False) == "step"
    t, _ = make_inputs("LSTM", 2, 2, 3, 4, torch.float32, proj=2)
    with pytest.raises(ValueError, match="'seq' variant needs no projection"):
        run_layer(triton_backend.layer, "LSTM", t, None, False, variant="seq")
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        run_layer(triton_backend.layer, "LSTM", t, None, False, cuda_graph=True)


@interpreted
def test_custom_op_registration():
    t, _ = make_inputs("RNN_TANH", 2, 2, 3, 4, torch.float32)
    args = ("RNN_TANH", t["x"], None, t["h0"], None, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], None, False,
            "seq", False, True)
    torch.library.opcheck(triton_backend.layer.fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@interpreted
def test_module_end_to_end():
    ref = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    fast = fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, backend="triton")
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
    env = dict(_env(interpret=True), **{SUBPROCESS_FLAG: "1"})
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert passed_count(res.stdout) > 0, "the child ran no test:\n" + res.stdout[-4000:]


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
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(interpret=False),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


@parent_only
def test_every_config_compiles_without_spills():
    # Every tile configuration the launch heuristics can pick, for sm_80 and sm_90 (see kernel_report).
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_report.py"), "--quick",
                          "--check", "--no-cuda", "--jobs", "2"], cwd=ROOT, env=_env(interpret=False),
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| step_") or line.startswith("| seq_")]
    kernels = {line.split("|")[1].strip() for line in rows}
    assert kernels == {"step_fwd", "step_bwd", "step_bwd_proj", "seq_fwd", "seq_bwd"}, kernels
    # the report names the assembler it used per target, and its CUDA version
    tools = re.findall(r"^- sm_(\d+)a?: `[^`]*ptxas[^`]*`, CUDA \d+\.\d+$", res.stdout, re.M)
    assert sorted(tools) == ["80", "90"], res.stdout[:1500]
