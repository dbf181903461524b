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
