"""The package without its extension, and the environment report."""

import os
import subprocess
import sys
import textwrap

import fastrnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTRNN_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_import_without_extension_warns_once_and_falls_back_to_reference():
    proc = _run(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastrnn._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastrnn
            import fastrnn.modules, fastrnn.backend
        import torch
        msgs = [str(w.message) for w in caught if "fastrnn._C" in str(w.message)]
        print("WARNINGS", len(msgs))
        m = fastrnn.GRU(3, 4)
        out, h = m(torch.randn(5, 2, 3))
        print("BACKEND", fastrnn.backend.resolve("auto", torch.device("cpu"), torch.float32).__name__)
        print("CPP", fastrnn.backend.reason_unavailable("cpp", torch.device("cpu"), torch.float32))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNINGS 1" in proc.stdout
    assert "BACKEND fastrnn.ops.reference" in proc.stdout
    assert "CPP " in proc.stdout and "None" not in proc.stdout.split("CPP ")[1]


def test_environment_report_lists_versions_and_backends():
    proc = subprocess.run([sys.executable, "-m", "fastrnn"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    import torch

    assert f"torch {torch.__version__}" in proc.stdout
    assert f"fastrnn {fastrnn.__version__}" in proc.stdout
    for name in fastrnn.BACKENDS:
        assert f"  {name}: " in proc.stdout
    assert "fastrnn._C: " in proc.stdout


def test_environment_report_flags_a_partial_isa_cap(monkeypatch):
    """Capped by fastrnn's and oneDNN's variables but not ATen's and MKL's, a process mixes two machines' paths:
    ``python -m fastrnn`` says so, naming the missing ones; capped by none or all, it says nothing."""
    from fastrnn import __main__ as cli
    from fastrnn._ext import ISA_CAPS

    for k in ISA_CAPS:
        monkeypatch.delenv(k, raising=False)
    assert "WARNING: the ISA is capped" not in cli.report()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    line = next(ln for ln in cli.report().splitlines() if ln.startswith("WARNING: the ISA is capped"))
    assert "capped by ONEDNN_MAX_CPU_ISA but not by FASTRNN_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS" in line


def test_import_leaves_triton_unimported_and_a_cpu_run_prints_nothing():
    proc = _run(
        """
        import sys, warnings
        warnings.simplefilter("always")
        import torch
        import fastrnn
        print("TRITON", "triton" in sys.modules, "DYNAMO", "torch._dynamo" in sys.modules)
        for m in (fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True), fastrnn.GRU(3, 4), fastrnn.RNN(3, 4),
                  fastrnn.LSTMCell(3, 4), fastrnn.GRUCell(3, 4), fastrnn.RNNCell(3, 4, nonlinearity="relu")):
            x = torch.randn(5, 2, 3) if isinstance(m, torch.nn.RNNBase) else torch.randn(2, 3)
            out = m(x)
            first = out[0] if isinstance(out, tuple) else out
            first.sum().backward()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "TRITON False DYNAMO False" in proc.stdout, proc.stdout


def test_backend_resolution_carries_dynamos_constant_mark():
    import torch

    from fastrnn import backend

    # fastrnn sets the attribute itself to keep torch._dynamo out of `import fastrnn`; if torch renames it,
    # this fails instead of torch.compile silently tracing (and graph-breaking) inside backend resolution
    probe = torch.compiler.assume_constant_result(lambda: 0)
    marks = {k for k, v in vars(probe).items() if v is True}
    assert marks and all(getattr(backend._resolve_name, k, None) is True for k in marks), marks


def test_readmes_hold_no_path_of_the_development_machine():
    # every command in a README must be one a user can paste: no corpus folder, venv or temporary folder
    # that exists only where the docs were written
    machine_only = ("/tmp/", "/work/", "/root/", "/home/", "../shared/")
    found = []
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".git", "runs", "__pycache__", ".venv")):
            continue
        for name in files:
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                for no, line in enumerate(open(path, encoding="utf-8"), 1):
                    found += [f"{os.path.relpath(path, ROOT)}:{no}: {line.strip()}" for p in machine_only if p in line]
    assert not found, "\n".join(found)
