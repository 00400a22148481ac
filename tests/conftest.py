"""Test setup shared by every file.

Triton kernels run on a CPU-only machine under its interpreter, which must be switched on before
any kernel module is imported.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A kernel cache of the suite's own: torch.compile's shared cache under the temp folder outlives
# installs, and a graph cached by another install of ddfast once aborted inside the compiled
# insertion test. (ddfast.perf.compile still splits it by ATEN_CPU_CAPABILITY.)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ddfast-inductor-"))
# ddfast's own cache (latents, random-real baselines) likewise: never the user's.
os.environ["DDFAST_CACHE"] = tempfile.mkdtemp(prefix="ddfast-cache-")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test.

    Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's spinning
    threads slow each small op by orders of magnitude; the setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BACKENDS = ["ref", "cpp", "triton"]


def skip_unless_backend_runs(name):
    """Skip where a backend cannot run on the CPU tensors of the parity tests: an unbuilt
    extension, or Triton without its interpreter (CI builds the extension and sets the
    interpreter, so nothing skips there; on a GPU, test_ops_gpu.py runs Triton and CUDA)."""
    from ddfast import _ext

    if name == "cpp" and not _ext.available():
        pytest.skip("compiled module not built")
    if name == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU: test_ops_gpu.py)")


@pytest.fixture(params=BACKENDS)
def use_backend(request, monkeypatch):
    """Run the test once per backend, forced through DDFAST_BACKEND."""
    skip_unless_backend_runs(request.param)
    monkeypatch.setenv("DDFAST_BACKEND", request.param)
    return request.param
