"""The compiled module and the Triton kernel against a float64 full-matrix computation."""

import os

import pytest
import torch

from ddfast import _ext


def degree_full_matrix(items: torch.Tensor) -> torch.Tensor:
    """s_i = sum_j cos(m_i, m_j) from the whole (K, K) cosine matrix, in float64."""
    x = items.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (unit @ unit.T).sum(dim=1)


def test_compiled_module_imports_and_reports_build():
    assert _ext.available(), "ddfast._C did not import: install with `pip install .`"
    from ddfast import _C

    assert isinstance(_C.has_cuda, bool)


@pytest.mark.parametrize("k,d", [(1, 7), (5, 33), (64, 256), (130, 1000)])
@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_similarity_degree_cpu_matches_full_matrix(k, d, threads, monkeypatch):
    monkeypatch.setenv("DDFAST_NUM_THREADS", threads)
    items = torch.randn(k, d) * torch.rand(k, 1) * 10  # rows of varied norm
    got = _ext.similarity_degree(items)
    want = degree_full_matrix(items)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * k)


def test_similarity_degree_cpu_is_thread_count_invariant(monkeypatch):
    items = torch.randn(97, 301)
    outs = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("DDFAST_NUM_THREADS", threads)
        outs.append(_ext.similarity_degree(items))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_similarity_degree_cpu_strided_rows_and_zero_rows():
    base = torch.randn(10, 50)
    base[3] = 0.0  # a zero item: its cosine with anything is 0 by the eps clamp
    view = base[:, :40]  # row stride 50, 40 columns
    got = _ext.similarity_degree(view)
    torch.testing.assert_close(got.double(), degree_full_matrix(view), rtol=1e-5, atol=1e-5)
    assert got[3].item() == 0.0


def test_similarity_degree_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        _ext.similarity_degree(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        _ext.similarity_degree(torch.randn(4, 3).T)
    with pytest.raises(ValueError, match="matrix"):
        _ext.similarity_degree(torch.randn(4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_similarity_degree_cuda_matches_full_matrix():
    assert _ext.has_cuda(), "built without CUDA kernels"
    items = torch.randn(300, 4096, device="cuda")
    got = _ext.similarity_degree(items)
    torch.testing.assert_close(got.double().cpu(), degree_full_matrix(items.cpu()),
                               rtol=1e-4, atol=1e-3)


def test_triton_similarity_degree_matches_full_matrix():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    from ddfast.kernels.similarity import similarity_degree

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, d in ((1, 16), (37, 100), (50, 64)):
        items = torch.randn(k, d, device=device) * 3
        got = similarity_degree(items)
        torch.testing.assert_close(got.double().cpu(), degree_full_matrix(items.cpu()),
                                   rtol=1e-5, atol=1e-5 * k)


def test_python_started_in_the_checkout_still_gets_the_compiled_module():
    """`python -m ddfast.train` run inside the checkout imports the source tree (the current
    folder comes first on sys.path), which holds no compiled module after `pip install .`; the
    installed distribution's module must serve it instead of the slow reference."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = ("import ddfast, ddfast._ext as e, pathlib, sys\n"
             "print(pathlib.Path(ddfast.__file__).resolve().parent.parent == "
             "pathlib.Path(sys.argv[1]), e.available())\n")
    out = subprocess.run([sys.executable, "-c", probe, str(root)], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]
