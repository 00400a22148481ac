"""torch.ops.ddfast.class_extremes on every backend that runs here, against ddfast.ref.

Values and gradients of x are compared with ``minimax_terms_ref`` (the spec); the chosen pairs
with ``class_extremes_ref``. Triton runs under TRITON_INTERPRET=1 on a CPU-only machine, with
small shapes (the interpreter costs per loop iteration).
"""

import warnings

import pytest
import torch
from conftest import BACKENDS, skip_unless_backend_runs

from ddfast import _ext, backend, perf
from ddfast.errors import ConfigError
from ddfast.memory import minimax_terms
from ddfast.ops import class_extremes
from ddfast.parity import LAMBDAS, check_extremes, check_ties, extremes_case, tie_case
from ddfast.ref import class_extremes_ref, minimax_terms_ref

# The cases and checks live in ddfast.parity, shared with ``python -m ddfast.check``.
random_case = extremes_case
check_parity = check_extremes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [1152, 4096, 37])
@pytest.mark.parametrize("slots", [1, 64])
def test_parity_random(use_backend, dtype, dim, slots, one_thread):
    if use_backend == "triton" and not torch.cuda.is_available():
        slots = min(slots, 16)  # the interpreter is slow
    case = random_case(8, 5, slots, dim, dtype, seed=dim * 131 + slots)
    check_parity(*case)
    if dim == 37:
        check_parity(*case, accumulate_bug=True)


def test_parity_large_memory_cpp(monkeypatch, one_thread):
    skip_unless_backend_runs("cpp")
    monkeypatch.setenv("DDFAST_BACKEND", "cpp")
    check_parity(*random_case(6, 4, 4096, 96, torch.float32, seed=7))


@pytest.mark.parametrize("largest", [True, False], ids=["max", "min"])
def test_exact_ties_go_to_first_pair(use_backend, largest):
    check_ties(largest)
    x, labels, items, counts = tie_case(largest)
    # Gradient: sample 1 alone, as the reference now gives it.
    real, fake = (items * 0.5, items) if largest else (items, items * 0.5)
    xg = x.clone().requires_grad_()
    minimax_terms(xg, labels, real, counts, fake, counts, **LAMBDAS).total.backward()
    xr = x.clone().requires_grad_()
    minimax_terms_ref(xr, labels, real, counts, fake, counts, **LAMBDAS).total.backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-7)
    term_rows = xr.grad[[1, 3]].abs().sum(1)
    assert term_rows[0] > 0 and term_rows[1] == 0


def test_reference_tie_gradient_goes_to_first_pair():
    x, labels, items, counts = tie_case(True)
    xr = x.clone().requires_grad_()
    terms = minimax_terms_ref(xr, labels, items, torch.zeros_like(counts), items, counts,
                              lambda_r=0.0, lambda_g=1.0)
    terms.total.backward()
    rows = xr.grad.abs().sum(1)
    assert rows[1] > 0 and rows[3] == 0


def test_zero_vectors(use_backend):
    """A zero sample has cosine 0 with everything and attains the min over a memory of items
    pointing its classmate's way; its gradient is m_hat / eps, as in the reference."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 48, generator=gen)
    x[0] = 0.0
    labels = torch.tensor([0, 0, 1, 1])
    counts = torch.tensor([3, 3])
    real = x[[1, 1, 1, 3, 3, 3]].view(2, 3, 48) + 0.1 * torch.randn(2, 3, 48, generator=gen)
    fake = real.clone()
    fake[1, 2] = 0.0  # a zero item: cosine 0
    check_parity(x, labels, real, counts, fake, counts)
    values, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, real, counts, False)
    assert values[0].item() == 0.0 and int(arg_sample[0]) == 0 and int(arg_slot[0]) == 0


def test_every_memory_empty_and_absent_classes(use_backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, generator=gen)
    labels = torch.tensor([2, 2, 0])
    items = torch.zeros(4, 6, 40)
    counts = torch.zeros(4, dtype=torch.long)
    for largest, fill in ((False, float("inf")), (True, float("-inf"))):
        values, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, items, counts,
                                                                       largest)
        assert values.eq(fill).all() and arg_sample.eq(-1).all() and arg_slot.eq(-1).all()
    counts[2] = 2
    items[2, :2] = torch.randn(2, 40, generator=gen)
    check_parity(x, labels, items, counts, items, counts)
    values, arg_sample, _ = torch.ops.ddfast.class_extremes(x, labels, items, counts, True)
    assert values[[0, 1, 3]].eq(float("-inf")).all() and arg_sample[[0, 1, 3]].eq(-1).all()


def test_cpp_is_thread_count_invariant(monkeypatch):
    skip_unless_backend_runs("cpp")
    x, labels, real, real_counts, _, _ = random_case(16, 5, 32, 100, torch.float32, seed=9)
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("DDFAST_NUM_THREADS", threads)
        outs.append(_ext.class_extremes(x, labels, real, real_counts, False))
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], out, strict=True))


def test_cpp_rejects_bad_input():
    skip_unless_backend_runs("cpp")
    x, items, counts = torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([4, 4, 4])
    with pytest.raises(IndexError, match="outside"):
        _ext.class_extremes(x, torch.tensor([0, 3]), items, counts, True)
    with pytest.raises(ValueError, match="same D"):
        _ext.class_extremes(x, torch.tensor([0, 1]), torch.randn(3, 4, 9), counts, True)
    with pytest.raises(ValueError, match="float32"):
        _ext.class_extremes(x.double(), torch.tensor([0, 1]), items, counts, True)


def test_float64_input_stays_float64(use_backend):
    x, labels, real, real_counts, _, _ = random_case(6, 4, 8, 20, torch.float64, seed=12)
    values, _, _ = torch.ops.ddfast.class_extremes(x, labels, real, real_counts, False)
    want = class_extremes_ref(x, labels, real, real_counts, False)[0]
    assert values.dtype == torch.float64 and torch.equal(values, want)


@pytest.mark.parametrize("name", BACKENDS)
def test_opcheck(name, monkeypatch):
    skip_unless_backend_runs(name)
    monkeypatch.setenv("DDFAST_BACKEND", name)
    x, labels, real, real_counts, fake, gen_counts = random_case(6, 4, 8, 24, torch.float32, 3)
    for items, counts, largest in ((real, real_counts, False), (fake, gen_counts, True)):
        args = (x.clone().requires_grad_(), labels, items, counts, largest)
        torch.library.opcheck(torch.ops.ddfast.class_extremes.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(one_thread):
    x, labels, real, real_counts, fake, gen_counts = random_case(6, 4, 8, 24, torch.float32, 5)

    def loss(x0):
        terms = minimax_terms(x0, labels, real, real_counts, fake, gen_counts, **LAMBDAS)
        return terms.total * 3.0 + (x0.float() ** 2).mean()

    torch._dynamo.reset()
    compiled = perf.compile(loss, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_value, compiled_value = loss(xe), compiled(xc)
    eager_value.backward()
    compiled_value.backward()
    torch.testing.assert_close(compiled_value, eager_value)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_opaque_direct_call_matches_library_op():
    x, labels, real, real_counts, _, _ = random_case(4, 4, 4, 16, torch.float32, 6)
    direct = class_extremes(x, labels, real, real_counts, True)
    via_ops = torch.ops.ddfast.class_extremes(x, labels, real, real_counts, True)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_ops, strict=True))


# Backend chooser.


def test_default_cpu_backend_is_cpp(monkeypatch):
    skip_unless_backend_runs("cpp")
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    assert backend.choose("class_extremes", "cpu") == "cpp"


@pytest.mark.parametrize("name", ["ref", "cpp"])
def test_env_override(name, monkeypatch):
    skip_unless_backend_runs(name)
    monkeypatch.setenv("DDFAST_BACKEND", name.upper())
    assert backend.choose("class_extremes", torch.device("cpu")) == name


def test_bad_override_names_the_choices(monkeypatch):
    monkeypatch.setenv("DDFAST_BACKEND", "fastest")
    with pytest.raises(ConfigError, match=r"DDFAST_BACKEND='fastest'.*ref, cpp, triton, cuda"):
        backend.choose("class_extremes", "cpu")


def test_override_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("DDFAST_BACKEND", "cuda")
    with pytest.raises(ConfigError, match="cannot run class_extremes on cpu"):
        backend.choose("class_extremes", "cpu")
    monkeypatch.setenv("DDFAST_BACKEND", "cpp")
    with pytest.raises(ConfigError, match="CPU only"):
        backend.choose("class_extremes", "cuda")
    monkeypatch.setenv("DDFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        backend.choose("class_extremes", "cpu")
    with pytest.raises(ValueError, match="unknown operation"):
        backend.choose("no_such_op", "cpu")


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    monkeypatch.setattr(backend._ext, "available", lambda: False)
    monkeypatch.setattr(backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.choose("class_extremes", "cpu") == "ref"
        assert backend.choose("class_extremes", "cpu") == "ref"
    assert len(caught) == 1 and "pip install -e ." in str(caught[0].message)


def test_cuda_default_order(monkeypatch):
    """cuda, then triton, then ref with one warning; no GPU is touched."""
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "find_spec", lambda name: object())
    monkeypatch.setattr(backend._ext, "has_cuda", lambda: True)
    for op_name in backend.OPS:
        assert backend.choose(op_name, "cuda") == "cuda"
    monkeypatch.setattr(backend._ext, "has_cuda", lambda: False)
    for op_name in backend.OPS:
        assert backend.choose(op_name, "cuda") == "triton"
    monkeypatch.setattr(backend, "find_spec", lambda name: None)
    with pytest.warns(RuntimeWarning, match="falls back"):
        assert backend.choose("class_extremes", "cuda") == "ref"
