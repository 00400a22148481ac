"""torch.ops.ddfast.insert_memory and prune_adaptive on every backend that runs here.

The oracle is ddfast.ref (insert_fifo_ref, insert_adaptive_ref, prune_adaptive_ref): a fused
insertion must leave exactly the reference's items (same survivors, same order, zeros in unused
slots) and counts. Triton runs under TRITON_INTERPRET=1 on a CPU-only machine, with small shapes
(the interpreter costs per loop iteration).
"""


import pytest
import torch
from conftest import BACKENDS, skip_unless_backend_runs

from ddfast import _ext, perf
from ddfast.memory import ClassMemory
from ddfast.ops import insert_memory, prune_adaptive
from ddfast.parity import check_insert, insert_case, memory, rows
from ddfast.ref import (
    COS_EPS,
    insert_adaptive_ref,
    insert_fifo_ref,
    prune_adaptive_ref,
    prune_fifo_ref,
)


@pytest.fixture
def use_cpp(monkeypatch):
    skip_unless_backend_runs("cpp")
    monkeypatch.setenv("DDFAST_BACKEND", "cpp")


def reference(items, counts, new_items, labels, adaptive):
    want_items, want_counts = items.clone(), counts.clone()
    (insert_adaptive_ref if adaptive else insert_fifo_ref)(want_items, want_counts, new_items,
                                                           labels)
    return want_items, want_counts


random_insert_case = insert_case  # shared with python -m ddfast.check (ddfast.parity)


# ---------------------------------------------------------------- insertion parity


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
@pytest.mark.parametrize("dim", [1152, 4096, 37])
@pytest.mark.parametrize("slots", [1, 64])
def test_insert_parity_cpp(use_cpp, one_thread, adaptive, dim, slots):
    items, counts, _, _ = random_insert_case(5, slots, dim, 16, seed=dim + slots)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        batch = rows(16, dim, gen)
        labels = torch.randint(0, 4, (16,), generator=gen)  # class 4 never in a batch
        check_insert(items, counts, batch, labels, adaptive)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
def test_insert_parity_cpp_long_case(use_cpp, one_thread, adaptive):
    """N 64, B 32, D 4096, full memories: every class evicts at every batch."""
    gen = torch.Generator().manual_seed(11)
    counts = torch.full((10,), 64, dtype=torch.int64)
    items = memory(10, 64, 4096, counts, gen)
    for _ in range(3):
        check_insert(items, counts, rows(32, 4096, gen), torch.randint(0, 10, (32,),
                                                                     generator=gen), adaptive)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
@pytest.mark.parametrize("shape", [(4, 8, 37, 6), (3, 1, 64, 5), (6, 4, 16, 6)])
def test_insert_parity_small(use_backend, one_thread, adaptive, shape):
    num_classes, slots, dim, batch = shape
    items, counts, new_items, labels = random_insert_case(num_classes, slots, dim, batch, 3)
    check_insert(items, counts, new_items, labels, adaptive)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        labels = torch.randint(0, num_classes - 1, (batch,), generator=gen)
        check_insert(items, counts, rows(batch, dim, gen), labels, adaptive)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
def test_insert_into_empty_memories(use_backend, adaptive):
    gen = torch.Generator().manual_seed(2)
    items, counts = torch.zeros(3, 4, 24), torch.zeros(3, dtype=torch.int64)
    labels = torch.tensor([0, 0, 0, 0, 0, 2])  # class 0 overflows at once; class 1 absent
    check_insert(items, counts, rows(6, 24, gen), labels, adaptive)
    assert counts.tolist() == [4, 0, 1]
    assert not items[1].any()


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
def test_empty_batch_is_a_no_op(use_backend, adaptive):
    items, counts, _, _ = random_insert_case(3, 4, 8, 2, 1)
    before = items.clone(), counts.clone()
    insert_memory(items, counts, torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64), adaptive)
    assert torch.equal(items, before[0]) and torch.equal(counts, before[1])


def test_duplicates_tie_exactly_and_the_oldest_goes(use_backend):
    """Every item equal: all degrees tie exactly, so the oldest go and the newest stay."""
    item = torch.linspace(-1.0, 2.0, 24)
    items = item.repeat(2, 4, 1)  # (2, 4, 24): class 0 full
    counts = torch.tensor([4, 0])
    items[1] = 0.0
    batch = torch.stack([item * 1.0] * 5)  # (5, 24): equal copies
    labels = torch.tensor([0, 0, 1, 0, 0])
    want_items, want_counts = reference(items, counts, batch, labels, True)
    insert_memory(items, counts, batch, labels, True)
    assert torch.equal(items, want_items) and torch.equal(counts, want_counts)
    assert counts.tolist() == [4, 1]
    assert torch.equal(items[0], item.repeat(4, 1))


def test_duplicates_among_random_items(use_backend):
    """Exact duplicates of memory items inside the batch and of each other."""
    gen = torch.Generator().manual_seed(4)
    counts = torch.tensor([3, 4, 0])
    items = memory(3, 4, 32, counts, gen)
    batch = torch.stack([items[0, 1], items[1, 0], items[1, 0], items[0, 1], items[1, 2],
                         items[1, 2]])  # (6, 32)
    labels = torch.tensor([0, 1, 1, 0, 1, 2])
    check_insert(items, counts, batch, labels, True)


@pytest.mark.parametrize("order", ["zero_first", "zero_last"])
def test_zero_vector_and_two_items_left_rule(use_backend, order):
    """N 1: with two items left the first goes, unless only the second is nonzero (a zero
    item's self-cosine is 0, so the nonzero one has the larger degree)."""
    gen = torch.Generator().manual_seed(6)
    v, zero = rows(1, 16, gen)[0], torch.zeros(16)
    old, new = (zero, v) if order == "zero_first" else (v, zero)
    items, counts = old.view(1, 1, 16).clone(), torch.tensor([1])
    check_insert(items, counts, new.view(1, 16), torch.tensor([0]), True)
    assert torch.equal(items[0, 0], zero)
    # Two nonzero items: the first (oldest) goes.
    items, counts = v.view(1, 1, 16).clone(), torch.tensor([1])
    w = rows(1, 16, gen)
    check_insert(items, counts, w, torch.tensor([0]), True)
    assert torch.equal(items[0, 0], w[0])


def test_two_nonzero_items_beside_zero_items(use_backend):
    """Two nonzero items among zero ones both have degree 1 + cos in exact arithmetic (the zero
    ones 0), so the first nonzero one goes whatever the rounding: from [0, a, 0, b] kept down to
    three items, a goes; then b (degree 1 against 0); then the first zero item."""
    gen = torch.Generator().manual_seed(16)
    for trial in range(20):
        a, b = rows(2, 24, gen)
        b = b * float(torch.rand((), generator=gen)) * 3  # another length: rounding differs
        x = torch.stack([torch.zeros(24), a, torch.zeros(24), b])  # (4, 24)
        for capacity, want in ((3, [0, 2, 3]), (2, [0, 2]), (1, [2])):
            got = prune_adaptive(x, capacity)
            assert got.tolist() == want, f"trial {trial}, capacity {capacity}"
        # The same pool as a memory of capacity 3 receiving b.
        items, counts = x[:3].clone().unsqueeze(0), torch.tensor([3])
        check_insert(items, counts, b.view(1, 24), torch.tensor([0]), True)
        assert torch.equal(items[0], torch.stack([torch.zeros(24), torch.zeros(24), b]))


def test_zero_vector_among_random_items(use_backend):
    gen = torch.Generator().manual_seed(8)
    counts = torch.tensor([4, 2])
    items = memory(2, 4, 20, counts, gen)
    items[0, 2] = 0.0  # a zero item inside a used slot
    batch = rows(5, 20, gen)
    batch[3] = 0.0
    check_insert(items, counts, batch, torch.tensor([0, 1, 0, 0, 1]), True)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fifo"])
def test_long_random_sequence_cpp(use_cpp, one_thread, adaptive):
    """200 batches, items and counts compared with the reference after every batch."""
    gen = torch.Generator().manual_seed(21)
    items, counts = torch.zeros(6, 16, 96), torch.zeros(6, dtype=torch.int64)
    want_items, want_counts = items.clone(), counts.clone()
    ref = insert_adaptive_ref if adaptive else insert_fifo_ref
    for step in range(200):
        batch = int(torch.randint(1, 13, (), generator=gen))
        new_items = rows(batch, 96, gen)
        labels = torch.randint(0, 5, (batch,), generator=gen)
        if step % 17 == 0:  # now and then, a duplicate of a stored item
            new_items[0] = want_items[int(labels[0]), 0]
        ref(want_items, want_counts, new_items, labels)
        insert_memory(items, counts, new_items, labels, adaptive)
        assert torch.equal(counts, want_counts), f"batch {step}"
        assert torch.equal(items, want_items), f"batch {step}"


def test_long_random_sequence_triton(monkeypatch, one_thread):
    skip_unless_backend_runs("triton")
    monkeypatch.setenv("DDFAST_BACKEND", "triton")
    gen = torch.Generator().manual_seed(22)
    items, counts = torch.zeros(3, 4, 16), torch.zeros(3, dtype=torch.int64)
    want_items, want_counts = items.clone(), counts.clone()
    for step in range(30):
        new_items = rows(6, 16, gen)
        labels = torch.randint(0, 3, (6,), generator=gen)
        insert_adaptive_ref(want_items, want_counts, new_items, labels)
        insert_memory(items, counts, new_items, labels, True)
        assert torch.equal(counts, want_counts), f"batch {step}"
        assert torch.equal(items, want_items), f"batch {step}"


def test_cpp_insert_is_thread_count_invariant(monkeypatch):
    skip_unless_backend_runs("cpp")
    items, counts, new_items, labels = random_insert_case(7, 8, 64, 40, 9)
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("DDFAST_NUM_THREADS", threads)
        got_items, got_counts = items.clone(), counts.clone()
        _ext.insert_memory(got_items, got_counts, new_items, labels, True)
        results.append((got_items, got_counts))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_cpp_insert_rejects_bad_input():
    skip_unless_backend_runs("cpp")
    items, counts = torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(IndexError, match="outside"):
        _ext.insert_memory(items, counts, torch.ones(1, 4), torch.tensor([2]), True)
    with pytest.raises(ValueError, match="float32"):
        _ext.insert_memory(items.double(), counts, torch.ones(1, 4), torch.tensor([0]), True)
    with pytest.raises(ValueError, match="new items"):
        _ext.insert_memory(items, counts, torch.ones(1, 5), torch.tensor([0]), True)


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("num", [100, 1300])
def test_prune_parity_cpp(use_cpp, num):
    x = rows(num, 1152, torch.Generator().manual_seed(num))
    got = prune_adaptive(x, 64)
    assert got.dtype == torch.int64
    assert torch.equal(got, prune_adaptive_ref(x, 64))


def test_prune_parity_cpp_with_duplicates_and_zeros(use_cpp):
    gen = torch.Generator().manual_seed(3)
    x = rows(200, 37, gen)
    x[50:60] = x[10]  # exact duplicates
    x[[7, 120]] = 0.0  # zero vectors
    for capacity in (64, 3, 2, 1, 0, 200, 250):
        assert torch.equal(prune_adaptive(x, capacity), prune_adaptive_ref(x, capacity))


@pytest.mark.parametrize("refresh_every", [0, 4, 64])
def test_cpp_prune_refresh_parameter(refresh_every):
    skip_unless_backend_runs("cpp")
    x = rows(150, 40, torch.Generator().manual_seed(12))
    want = prune_adaptive_ref(x, 10, refresh_every=refresh_every)
    assert torch.equal(_ext.prune_adaptive(x, 10, refresh_every, COS_EPS), want)


def test_prune_small_every_backend(use_backend):
    gen = torch.Generator().manual_seed(13)
    x = rows(20, 16, gen)
    x[5] = x[2]
    x[9] = 0.0
    for capacity in (4, 3, 2, 1, 20):
        assert torch.equal(prune_adaptive(x, capacity), prune_adaptive_ref(x, capacity))


def test_triton_prune_refreshes_like_the_reference():
    skip_unless_backend_runs("triton")
    from ddfast.kernels.memory_insert import prune_adaptive as triton_prune

    x = rows(24, 16, torch.Generator().manual_seed(14))
    for refresh_every in (0, 3):
        want = prune_adaptive_ref(x, 5, refresh_every=refresh_every)
        assert torch.equal(triton_prune(x, 5, refresh_every, COS_EPS), want)


def exact_prune(x, capacity):
    """The adaptive rule recomputed from scratch at every eviction in float64: O(K^2 D)."""
    units = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(COS_EPS)  # (K, D)
    alive = torch.ones(x.shape[0], dtype=torch.bool)  # (K,)
    for _ in range(x.shape[0] - capacity):
        degree = (units * units[alive].sum(0)).sum(-1)  # (K,) equal rows tie exactly
        alive[int(degree.masked_fill(~alive, float("-inf")).argmax())] = False
    return alive.nonzero().squeeze(1)


def drift_case(seed):
    """1300 rows: 900 exact copies of a vector spread over 8 coordinates, which go first, and
    400 random ones. Subtracting the 900 copies from a float32 running sum whose entries reach
    ~100s leaves errors large enough to change later choices among the random rows."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.zeros(64)
    centre[:8] = torch.rand(8, generator=gen) + 0.5
    x = centre.repeat(1300, 1)  # (1300, 64)
    spread = torch.randperm(1300, generator=gen)[:400]
    x[spread] = torch.randn(400, 64, generator=gen)
    return x


@pytest.mark.slow
def test_refresh_guards_against_float32_drift(one_thread):
    """Without the periodic exact recomputation the float32 reference's choices drift away from
    the exact float64 rule; with it (and in the C++ path) they match it."""
    drifted = 0
    for seed in (1, 2, 3):
        x = drift_case(seed)
        exact = exact_prune(x, 64)
        assert torch.equal(prune_adaptive_ref(x, 64), exact)
        drifted += not torch.equal(prune_adaptive_ref(x, 64, refresh_every=0), exact)
        if _ext.available():
            assert torch.equal(_ext.prune_adaptive(x, 64, 64, COS_EPS), exact)
    assert drifted >= 2


@pytest.mark.slow
def test_cpp_prune_matches_the_exact_rule_on_random_data(one_thread):
    skip_unless_backend_runs("cpp")
    x = rows(1300, 256, torch.Generator().manual_seed(15))
    assert torch.equal(_ext.prune_adaptive(x, 64, 64, COS_EPS), exact_prune(x, 64))


def test_prune_float64_stays_exact(use_backend):
    x = rows(30, 8, torch.Generator().manual_seed(16)).double()
    assert torch.equal(prune_adaptive(x, 5), prune_adaptive_ref(x, 5))


# ---------------------------------------------------------------- library op behaviour


@pytest.mark.parametrize("name", BACKENDS)
def test_opcheck(name, monkeypatch):
    skip_unless_backend_runs(name)
    monkeypatch.setenv("DDFAST_BACKEND", name)
    for adaptive in (True, False):
        items, counts, new_items, labels = random_insert_case(4, 4, 24, 6, 17)
        torch.library.opcheck(torch.ops.ddfast.insert_memory.default,
                              (items, counts, new_items, labels, adaptive))
    x = rows(20, 24, torch.Generator().manual_seed(18))
    torch.library.opcheck(torch.ops.ddfast.prune_adaptive.default, (x, 6))


@pytest.mark.slow
def test_torch_compile_fullgraph_insert_matches_eager(use_cpp, one_thread):
    items, counts, new_items, labels = random_insert_case(4, 4, 24, 6, 19)
    want_items, want_counts = reference(items, counts, new_items, labels, True)

    def step(mem, cnt, batch, lab):
        insert_memory(mem, cnt, batch * 1.0, lab, True)
        return cnt.sum()

    torch._dynamo.reset()
    compiled = perf.compile(step, fullgraph=True)
    total = compiled(items, counts, new_items, labels)
    assert torch.equal(items, want_items) and torch.equal(counts, want_counts)
    assert int(total) == int(want_counts.sum())
    x = rows(20, 24, torch.Generator().manual_seed(20))
    compiled_prune = perf.compile(lambda t: prune_adaptive(t, 6) + 0, fullgraph=True)
    assert torch.equal(compiled_prune(x), prune_adaptive_ref(x, 6))


# ---------------------------------------------------------------- ClassMemory wiring


@pytest.mark.parametrize("policy", ["adaptive", "fifo"])
def test_class_memory_step_insert_uses_the_op(use_backend, policy):
    gen = torch.Generator().manual_seed(23)
    mem = ClassMemory(3, 4, 16, policy=policy, timing="step")
    want_items, want_counts = mem.items.clone(), mem.counts.clone()
    for _ in range(4):
        batch, labels = rows(5, 16, gen), torch.randint(0, 3, (5,), generator=gen)
        mem.insert(batch, labels)
        (insert_adaptive_ref if policy == "adaptive" else insert_fifo_ref)(
            want_items, want_counts, batch, labels)
    assert torch.equal(mem.items, want_items) and torch.equal(mem.counts, want_counts)


@pytest.mark.parametrize("policy", ["adaptive", "fifo"])
def test_class_memory_end_epoch_matches_reference(use_backend, policy):
    gen = torch.Generator().manual_seed(24)
    mem = ClassMemory(3, 4, 16, policy=policy, timing="epoch")
    batches = [(rows(6, 16, gen), torch.randint(0, 2, (6,), generator=gen)) for _ in range(2)]
    for batch, labels in batches:
        mem.insert(batch, labels)
    mem.end_epoch()
    allx = torch.cat([b for b, _ in batches])
    alll = torch.cat([lab for _, lab in batches])
    for c in range(3):
        pool = allx[alll == c]
        keep = (prune_adaptive_ref(pool, 4) if policy == "adaptive"
                else prune_fifo_ref(pool.shape[0], 4))
        assert torch.equal(mem.class_items(c), pool[keep])
