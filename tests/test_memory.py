"""ddfast.memory and ddfast.ref against deliberately naive versions of method.md sections 2-3.

The naive versions keep Python lists per class, loop over classes and items, build full cosine
matrices in float64 and choose with Python min/max: the spec read word for word.
"""

import math

import pytest
import torch

from ddfast.errors import ConfigError
from ddfast.memory import ClassMemory, MemoryBank, minimax_terms
from ddfast.ref import prune_adaptive_ref, similarity_degree_ref

EPS = 1e-8


def naive_cos(a, b):
    """Full cosine matrix (len(a), len(b)) in float64, norms floored at EPS."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1).clamp_min(EPS), b.norm(dim=1).clamp_min(EPS)
    return (a[:, None, :] * b[None, :, :]).sum(-1) / (na[:, None] * nb[None, :])


def naive_degrees(items):
    """s_i = sum_j cos(m_i, m_j), with the ties of exact arithmetic kept exact: cos(m, m) = 1
    for a nonzero m, cos(m_i, m_j) = cos(m_j, m_i), and an exactly rounded (order-free) sum, so
    two items, or duplicates, tie bitwise."""
    k = len(items)
    cos = [[0.0] * k for _ in range(k)]
    for i in range(k):
        cos[i][i] = 1.0 if items[i].norm() >= EPS else 0.0
        for j in range(i + 1, k):
            cos[i][j] = cos[j][i] = float(naive_cos(items[i][None], items[j][None]))
    return [math.fsum(row) for row in cos]


def naive_shrink(items, capacity, policy):
    while len(items) > capacity:
        if policy == "fifo":
            items.pop(0)
        else:
            degree = naive_degrees(items)
            items.pop(degree.index(max(degree)))


class NaiveMemory:
    def __init__(self, num_classes, capacity, policy, timing):
        self.capacity, self.policy, self.timing = capacity, policy, timing
        self.mem = [[] for _ in range(num_classes)]
        self.staged = [[] for _ in range(num_classes)]

    def insert(self, items, labels):
        target = self.staged if self.timing == "epoch" else self.mem
        for x, c in zip(items, labels.tolist(), strict=True):
            target[c].append(x.detach().float().clone())
        if self.timing == "step":
            for c in set(labels.tolist()):
                naive_shrink(self.mem[c], self.capacity, self.policy)

    def end_epoch(self):
        if self.timing == "epoch":
            for c in range(len(self.mem)):
                self.mem[c] += self.staged[c]
                self.staged[c] = []
                naive_shrink(self.mem[c], self.capacity, self.policy)


def python_argext(sim, largest):
    flat = sim.flatten().tolist()
    return flat.index(max(flat) if largest else min(flat)) // sim.shape[1]


def naive_loss(x, labels, real, gen, lambda_r, lambda_g, accumulate_bug=False):
    """Returns total, rep list, div list and the set of samples of the extreme pairs."""
    num_classes = len(real.mem)
    rep, div = [0.0] * num_classes, [0.0] * num_classes
    labels = labels.tolist()
    classes = list(set(labels))  # the released loop's order (matters only for accumulate_bug)
    n = len(classes)
    zero = 0 * x.sum()  # keeps the graph when no class qualifies
    total, run_r, run_g, extremes = zero, zero, zero, set()
    for c in classes:
        if gen.mem[c]:
            rows = [i for i, label in enumerate(labels) if label == c]
            if real.mem[c]:
                sim = naive_cos(x[rows], torch.stack(real.mem[c]))
                rep[c] = lambda_r / n * (1 - sim.min())
                run_r = run_r + rep[c]
                extremes.add(rows[python_argext(sim, largest=False)])
            sim = naive_cos(x[rows], torch.stack(gen.mem[c]))
            div[c] = lambda_g / n * sim.max()
            run_g = run_g + div[c]
            extremes.add(rows[python_argext(sim, largest=True)])
            if not accumulate_bug:
                total = total + rep[c] + div[c]
        if accumulate_bug:  # the released loop: running sums added once per batch class
            total = total + run_r + run_g
    return total, [float(torch.as_tensor(v).detach()) for v in rep], \
        [float(torch.as_tensor(v).detach()) for v in div], extremes


def assert_same_items(memory, naive):
    for c in range(memory.num_classes):
        want = torch.stack(naive.mem[c]) if naive.mem[c] else torch.zeros(0, memory.dim)
        got = memory.class_items(c)
        assert torch.equal(got, want), f"class {c}: got {got.shape[0]} items, want {want.shape}"


def make_batch(gen, num_classes, batch, dim, centres):
    present = torch.randperm(num_classes, generator=gen)[: max(1, num_classes // 2)]
    labels = present[torch.randint(len(present), (batch,), generator=gen)]
    z0 = centres[labels] + 0.7 * torch.randn(batch, dim, generator=gen)  # (B, D)
    x = z0 + 0.5 * torch.randn(batch, dim, generator=gen)  # (B, D) distinct rows
    return labels, z0, x


def check_step(bank, naive_real, naive_gen, x, labels, lambda_r, lambda_g):
    xr = x.clone().requires_grad_()
    terms = bank.loss(xr, labels, lambda_r=lambda_r, lambda_g=lambda_g)
    terms.total.backward()
    xn = x.double().requires_grad_()
    total, rep, div, extremes = naive_loss(xn, labels, naive_real, naive_gen, lambda_r, lambda_g)
    total.backward()
    torch.testing.assert_close(terms.total.double(), total.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms.rep.double(), torch.tensor(rep, dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms.div.double(), torch.tensor(div, dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(xr.grad.double(), xn.grad, rtol=1e-5, atol=1e-9)
    nonzero = set(xr.grad.abs().sum(1).nonzero().flatten().tolist())
    assert nonzero == extremes, f"gradient rows {nonzero}, extreme samples {extremes}"


@pytest.mark.parametrize("policy", ["fifo", "adaptive"])
@pytest.mark.parametrize("timing", ["step", "epoch"])
@pytest.mark.parametrize("num_classes,batch", [(5, 8), (12, 6)])  # class rows / sample rows
def test_random_sequence_matches_naive(policy, timing, num_classes, batch):
    gen = torch.Generator().manual_seed(1000 * num_classes + batch + (timing == "epoch"))
    dim, n_real, n_gen = 16, 5, 3
    centres = 2.0 * torch.randn(num_classes, dim, generator=gen)  # (C, D)
    bank = MemoryBank(num_classes, dim, real_capacity=n_real, gen_capacity=n_gen,
                      policy=policy, timing=timing, stage_capacity=4)
    naive_real = NaiveMemory(num_classes, n_real, policy, timing)
    naive_gen = NaiveMemory(num_classes, n_gen, policy, timing)
    previous = None
    for step in range(24):
        labels, z0, x = make_batch(gen, num_classes, batch, dim, centres)
        check_step(bank, naive_real, naive_gen, x, labels, 0.002, 0.008)
        x_ins = x.clone()
        if step % 3 == 1:  # duplicates: a repeated row of one class, a re-inserted old item
            labels[1] = labels[0]
            z0[1], x_ins[1] = z0[0], x_ins[0]
            if previous is not None:
                labels[2], z0[2] = previous[0][0], previous[1][0]
        bank.update(z0, x_ins, labels)
        naive_real.insert(z0, labels)
        naive_gen.insert(x_ins, labels)
        if timing == "epoch" and step % 4 == 3:
            assert bank.real.num_staged == 4 * batch
            bank.end_epoch()
            naive_real.end_epoch()
            naive_gen.end_epoch()
        assert_same_items(bank.real, naive_real)
        assert_same_items(bank.gen, naive_gen)
        previous = (labels, z0)
    assert int(bank.real.counts.sum()) > 0 and int(bank.gen.counts.sum()) > 0


@pytest.mark.parametrize("policy", ["fifo", "adaptive"])
@pytest.mark.parametrize("num_classes", [2, 20])
@pytest.mark.parametrize("capacity", [1, 3])
def test_batch_larger_than_capacity(policy, num_classes, capacity):
    gen = torch.Generator().manual_seed(7 + capacity)
    memory = ClassMemory(num_classes, capacity, 8, policy=policy)
    naive = NaiveMemory(num_classes, capacity, policy, "step")
    for _ in range(4):
        items = torch.randn(8, 8, generator=gen) + torch.randn(8, generator=gen)
        labels = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1])
        memory.insert(items, labels)
        naive.insert(items, labels)
        assert_same_items(memory, naive)
    assert memory.counts.tolist()[:2] == [min(4, capacity), capacity]
    if policy == "fifo":
        assert torch.equal(memory.class_items(1), items[8 - capacity :])
    assert memory.items[:, capacity:].numel() == 0 or not memory.items[:, capacity:].any()


def test_absent_class_is_untouched_and_gets_no_term():
    gen = torch.Generator().manual_seed(3)
    bank = MemoryBank(4, 6, real_capacity=4, gen_capacity=4)
    warm = torch.randn(8, 6, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    bank.update(warm, warm + 0.1, labels)
    before = bank.real.items.clone()
    batch = torch.randn(3, 6, generator=gen)
    terms = bank.loss(batch, torch.tensor([2, 2, 2]))
    assert terms.rep[[0, 1, 3]].eq(0).all() and terms.div[[0, 1, 3]].eq(0).all()
    assert terms.rep[2] > 0 and terms.div[2] != 0
    bank.update(batch, batch, torch.tensor([2, 2, 2]))
    assert torch.equal(bank.real.items[[0, 1, 3]], before[[0, 1, 3]])


def test_duplicates_and_exact_ties_evict_first_index():
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 1, 0]), torch.tensor([0, 0, 1.0])
    memory = ClassMemory(2, 3, 3, policy="adaptive")
    memory.insert(torch.stack([a, b, a, c]), torch.zeros(4, dtype=torch.long))
    # s_a = 2 + cos(a, b) is the largest, held by both copies of a: the first copy goes.
    assert torch.equal(memory.class_items(0), torch.stack([b, a, c]))
    eye = torch.eye(3)
    memory = ClassMemory(1, 2, 3, policy="adaptive")
    memory.insert(eye, torch.zeros(3, dtype=torch.long))  # all degrees exactly 1
    assert torch.equal(memory.class_items(0), eye[1:])
    assert prune_adaptive_ref(torch.stack([b, a, c, a]), 3).tolist() == [0, 2, 3]


def test_empty_generated_memory_skips_both_terms():
    bank = MemoryBank(3, 5)
    bank.real.insert(torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))
    x = torch.randn(4, 5, requires_grad=True)
    terms = bank.loss(x, torch.tensor([0, 1, 1, 2]))
    assert terms.total.item() == 0.0 and not terms.rep.any() and not terms.div.any()
    terms.total.backward()
    assert x.grad is not None and not x.grad.any()


def test_empty_real_memory_skips_only_representativeness():
    bank = MemoryBank(2, 5)
    gen_items = torch.randn(3, 5)
    bank.gen.insert(gen_items, torch.tensor([1, 1, 1]))
    x = torch.randn(2, 5)
    terms = bank.loss(x, torch.tensor([1, 0]))
    assert terms.rep.eq(0).all()
    want = 0.008 / 2 * naive_cos(x[:1], gen_items).max()  # n = 2: class 0 counts, unqualified
    torch.testing.assert_close(terms.div[1].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.total, terms.div[1])


def test_n_counts_every_distinct_class_in_the_batch():
    gen = torch.Generator().manual_seed(5)
    bank = MemoryBank(5, 4, policy="fifo")
    real, fake = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    bank.update(real, fake, torch.zeros(3, dtype=torch.long))
    x = torch.randn(5, 4, generator=gen)
    labels = torch.tensor([0, 3, 0, 4, 3])  # n = 3, only class 0 has memories
    terms = bank.loss(x, labels, lambda_r=0.5, lambda_g=0.25)
    rows = x[[0, 2]]
    torch.testing.assert_close(terms.rep[0].double(), 0.5 / 3 * (1 - naive_cos(rows, real).min()))
    torch.testing.assert_close(terms.div[0].double(), 0.25 / 3 * naive_cos(rows, fake).max())


def test_gradient_reaches_one_sample_per_term():
    gen = torch.Generator().manual_seed(11)
    bank = MemoryBank(1, 8, real_capacity=6, gen_capacity=6)
    bank.update(torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen),
                torch.zeros(6, dtype=torch.long))
    for lambda_r, lambda_g in ((1.0, 0.0), (0.0, 1.0)):
        x = torch.randn(6, 8, generator=gen, dtype=torch.bfloat16).requires_grad_()
        terms = bank.loss(x, torch.zeros(6, dtype=torch.long), lambda_r=lambda_r,
                          lambda_g=lambda_g)
        assert terms.total.dtype == torch.float32
        terms.total.backward()
        assert int(x.grad.float().abs().sum(1).gt(0).sum()) == 1


@pytest.mark.parametrize("batch", [
    [4, 0, 2, 5, 0, 1, 4],  # a class without memory (5) still adds the running sums
    [3, 9, 3],  # CPython visits set([3, 9]) as 9, 3: class 9 counts twice, not class 3
    [2, 9],
    [0, 8, 4, 8],  # set order 0, 8, 4
    [9, 1, 8, 0],  # slots collide in a small table: the order follows insertion
])
def test_accumulate_bug_reproduces_released_loop(batch):
    gen = torch.Generator().manual_seed(13)
    num_classes, dim = 10, 8
    bank = MemoryBank(num_classes, dim, real_capacity=4, gen_capacity=4)
    real = NaiveMemory(num_classes, 4, "adaptive", "step")
    fake = NaiveMemory(num_classes, 4, "adaptive", "step")
    warm_labels = torch.tensor([0, 1, 2, 3, 4, 8, 9, 0, 1, 2, 3, 4, 8, 9])
    z0 = torch.randn(len(warm_labels), dim, generator=gen)
    x0 = torch.randn(len(warm_labels), dim, generator=gen)
    bank.update(z0, x0, warm_labels)
    real.insert(z0, warm_labels)
    fake.insert(x0, warm_labels)
    labels = torch.tensor(batch)
    x = torch.randn(len(batch), dim, generator=gen)
    terms = bank.loss(x, labels, accumulate_bug=True)
    total = naive_loss(x.double(), labels, real, fake, 0.002, 0.008, accumulate_bug=True)[0]
    torch.testing.assert_close(terms.total.double(), total, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.total, terms.rep.sum() + terms.div.sum())
    fixed = bank.loss(x, labels)
    assert terms.total > fixed.total  # classes visited first count more than once
    order = list(dict.fromkeys(set(batch)))  # Python's order, which the weights must follow
    counts = {c: len(order) - j for j, c in enumerate(order)}
    for c in order:
        if fake.mem[c]:
            torch.testing.assert_close(terms.div[c], fixed.div[c] * counts[c])


def naive_full_prune(x, capacity):
    """The O(K^2 D) rule: the full cosine matrix, degrees re-summed after every eviction."""
    u = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(EPS)
    cos = u @ u.T  # (K, K)
    alive = torch.ones(x.shape[0], dtype=torch.float64)
    for _ in range(x.shape[0] - capacity):
        degree = (cos @ alive).masked_fill(alive == 0, -math.inf)
        alive[int(degree.argmax())] = 0
    return alive.nonzero().flatten()


def test_running_sum_prune_equals_full_matrix_rule():
    gen = torch.Generator().manual_seed(17)
    # Clustered data, like latents of one class: a shared mean plus spread.
    x = 0.5 * torch.randn(64, generator=gen) + torch.randn(2000, 64, generator=gen)  # (K, D)
    want = naive_full_prune(x, 64)
    assert torch.equal(prune_adaptive_ref(x.double(), 64), want)
    assert torch.equal(prune_adaptive_ref(x, 64), want)  # fp32, running sum refreshed every 64
    assert torch.equal(prune_adaptive_ref(x, 64, refresh_every=1), want)


def test_similarity_degree_matches_matrix():
    x = torch.randn(3, 30, 12)
    x[0, 4] = 0  # a zero item has cosine 0 with everything
    want = torch.stack([naive_cos(m, m).sum(1) for m in x])
    torch.testing.assert_close(similarity_degree_ref(x).double(), want, rtol=1e-5, atol=1e-6)


def test_mean_pairwise_cosine():
    memory = ClassMemory(3, 5, 6)
    items = torch.randn(6, 6)
    memory.insert(items, torch.tensor([0, 0, 0, 0, 1, 1]))
    got = memory.mean_pairwise_cosine()
    for c, rows in ((0, items[:4]), (1, items[4:])):
        cos = naive_cos(rows, rows)
        want = (cos.sum() - cos.diagonal().sum()) / (len(rows) * (len(rows) - 1))
        torch.testing.assert_close(got[c].double(), want, rtol=1e-5, atol=1e-6)
    assert math.isnan(got[2])


@pytest.mark.parametrize("timing", ["step", "epoch"])
def test_state_dict_round_trip(timing):
    gen = torch.Generator().manual_seed(19)
    bank = MemoryBank(4, 6, real_capacity=3, gen_capacity=2, timing=timing)
    for _ in range(3):
        items, labels = torch.randn(5, 6, generator=gen), torch.randint(4, (5,), generator=gen)
        bank.update(items, items * 2, labels)
    if timing == "epoch":
        bank.end_epoch()
        bank.update(items, items, labels)  # leave some staged
    state = bank.state_dict()
    assert all(isinstance(v, (torch.Tensor, str, int)) for v in state.values())  # flat
    copy = MemoryBank(4, 6, real_capacity=3, gen_capacity=2, timing=timing)
    copy.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    for mine, theirs in ((bank.real, copy.real), (bank.gen, copy.gen)):
        assert torch.equal(mine.items, theirs.items) and torch.equal(mine.counts, theirs.counts)
        assert mine.num_staged == theirs.num_staged
    bank.update(items, items, labels)
    copy.update(items, items, labels)
    bank.end_epoch()
    copy.end_epoch()
    assert torch.equal(bank.gen.items, copy.gen.items)


def test_load_state_dict_rejects_mismatch():
    state = ClassMemory(4, 3, 6).state_dict()
    with pytest.raises(ConfigError, match="capacity"):
        ClassMemory(4, 5, 6).load_state_dict(state)
    with pytest.raises(ConfigError, match="policy"):
        ClassMemory(4, 3, 6, policy="fifo").load_state_dict(state)
    bad = dict(state, items=torch.zeros(4, 3, 7))
    with pytest.raises(ConfigError, match=r"shape \(4, 3, 7\).*\(4, 3, 6\)"):
        ClassMemory(4, 3, 6).load_state_dict(bad)
    with pytest.raises(ConfigError, match="counts"):
        ClassMemory(4, 3, 6).load_state_dict(dict(state, counts=torch.full((4,), 9)))
    with pytest.raises(ConfigError, match="missing"):
        ClassMemory(4, 3, 6).load_state_dict({"items": state["items"]})
    with pytest.raises(ConfigError, match="'real.*' and 'gen.*'"):
        MemoryBank(4, 6).load_state_dict(state)
    with pytest.raises(ConfigError, match="capacity=64 but this memory has capacity=5"):
        MemoryBank(4, 6, gen_capacity=5).load_state_dict(MemoryBank(4, 6).state_dict())


def test_bad_arguments():
    with pytest.raises(ConfigError, match="policy"):
        ClassMemory(2, 3, 4, policy="lru")
    with pytest.raises(ConfigError, match="timing"):
        MemoryBank(2, 4, timing="batch")
    with pytest.raises(ConfigError, match="capacity"):
        ClassMemory(2, 0, 4)
    memory = ClassMemory(2, 3, 4)
    with pytest.raises(ValueError, match="dim=4"):
        memory.insert(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        memory.insert(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        memory.insert(torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="class index"):
        memory.class_items(2)
    bank = MemoryBank(2, 4)
    with pytest.raises(ConfigError, match="lambda_g"):
        bank.loss(torch.randn(2, 4), torch.tensor([0, 1]), lambda_g=-1.0)
    with pytest.raises(ValueError, match="empty batch"):
        bank.loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="real_counts"):
        minimax_terms(torch.randn(2, 4), torch.tensor([0, 1]), bank.real.items,
                      torch.zeros(3, dtype=torch.long), bank.gen.items, bank.gen.counts,
                      lambda_r=0.1, lambda_g=0.1)


def test_latent_shaped_inputs_are_flattened():
    bank = MemoryBank(2, 4 * 2 * 2, real_capacity=2, gen_capacity=2)
    z0 = torch.randn(3, 4, 2, 2)
    bank.update(z0, z0.neg(), torch.tensor([1, 1, 0]))
    assert torch.equal(bank.real.class_items(1), z0[:2].flatten(1))
    terms = bank.loss(z0.neg().requires_grad_(), torch.tensor([1, 1, 0]))
    torch.testing.assert_close(terms.div[1], torch.tensor(0.008 / 2))  # cos(x, x) = 1
