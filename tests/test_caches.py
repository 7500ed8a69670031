"""The plan caches are bounded by the bytes they hold, not by their number of entries, and
``equiproj.clear_caches()`` empties every cache; memory stays flat with ever new reps."""

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

import equiproj as ep
from equiproj._caches import _CACHES, ByteBoundedCache, bytes_cached, tensor_bytes
from equiproj._plan import block_plan
from equiproj.ops import _op
from equiproj.testing import random_orthogonal


def _malloc_trim() -> None:
    """Hands the C heap's free pages back to the OS (glibc), so that RSS counts what is held, not the
    allocator's slack in a process that has already run many other tests."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def rss_bytes() -> int:
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def limit_every_cache(monkeypatch, max_bytes: int) -> int:
    """Sets the budget of every byte-bounded cache (the plan caches and the converted lru caches) and
    empties them; returns how many there are."""
    caches = list(_CACHES)
    for cache in caches:
        monkeypatch.setattr(cache, "max_bytes", max_bytes)
    ep.clear_caches()
    return len(caches)


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(1000, dtype=torch.float64)
    obj = {"x": a, "views": [a[:10], a[5:]], "t": (torch.zeros(10, dtype=torch.float32),)}
    assert tensor_bytes(obj) == 8000 + 40


def test_cache_evicts_least_recently_used_beyond_its_bytes():
    cache = ByteBoundedCache("test", max_bytes=10_000)
    for k in range(5):
        cache.put(k, torch.zeros(500, dtype=torch.float64))  # 4,000 bytes each
        cache.get(0)  # 0 stays the most recently used
    assert len(cache) == 2 and 0 in cache and 4 in cache and cache.bytes == 8000
    cache.put("big", torch.zeros(5000, dtype=torch.float64))  # larger than the budget: kept alone
    assert len(cache) == 1 and "big" in cache
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_entries_growing_after_they_are_stored_are_measured_again():
    cache = ByteBoundedCache("test", max_bytes=10_000)
    holder = {"copies": []}
    cache.put("a", holder)
    holder["copies"].append(torch.zeros(1000, dtype=torch.float64))  # a lazy device copy, say
    cache.put("b", torch.zeros(10, dtype=torch.float64))
    assert cache.bytes == 8000 + 80
    holder["copies"].append(torch.zeros(1000, dtype=torch.float64))
    cache.put("c", torch.zeros(10, dtype=torch.float64))  # measures "b" again only: "a" is counted at 8,000
    assert len(cache) == 3


def test_decorated_function_caches_and_clears():
    calls = []

    @bytes_cached("test", max_bytes=1 << 20)
    def f(n):
        calls.append(n)
        return torch.zeros(n)

    assert f(3) is f(3) and calls == [3]
    assert f.cache_info().currsize == 1 and f.cache_info().hits == 1
    ep.clear_caches()
    assert f.cache_info().currsize == 0
    f(3)
    assert calls == [3, 3]


def test_clear_caches_empties_the_plan_caches_and_lru_caches():
    G = ep.Cyclic(5)
    r = 2 * G.regular()
    ep.energies(torch.randn(r.dim, r.dim), r, r)
    assert block_plan.cache_info().currsize >= 1 and len(_op._PLANS_BY_META) >= 1
    ep.clear_caches()
    assert block_plan.cache_info().currsize == 0 and len(_op._PLANS_BY_META) == 0
    from equiproj.groups import _clebsch_gordan  # an lru_cache of the groups layer
    fns = [v for v in vars(_clebsch_gordan).values() if hasattr(v, "cache_info")]
    assert fns and all(v.cache_info().currsize == 0 for v in fns)
    ep.energies(torch.randn(r.dim, r.dim), r, r)  # rebuilt on demand


def test_plan_cache_bytes_stay_within_budget_with_fresh_large_reps(gen, monkeypatch):
    """Fresh 1024-dim reps (a new change of basis each call): the cache keeps at most its budget."""
    monkeypatch.setattr(block_plan.cache, "max_bytes", 64 << 20)
    monkeypatch.setattr(_op._PLANS_BY_META, "max_bytes", 64 << 20)
    ep.clear_caches()
    G = ep.SO2()
    base = ep.Rep.parse(G, "512x0 + 256x1")
    Q = random_orthogonal(base.dim, gen)
    W = torch.randn(2, base.dim, generator=gen)
    out = 2 * G.trivial()
    sizes = []
    for k in range(12):
        P = Q.clone()
        P[:, [0, k + 1]] = P[:, [k + 1, 0]]  # a new rep each call (columns swapped)
        ep.energies(W, base.change_basis(P), out)
        sizes.append(block_plan.cache_info().bytes)
    assert max(sizes) <= 64 << 20
    assert sizes[-1] >= 24 << 20  # the entries are measured: each holds its reps' dense matrices
    assert block_plan.cache_info().currsize < 12


def _rss_over_fresh_1024_dim_reps(gen, calls: int, every: int) -> list[int]:
    """RSS (after a gc) every ``every`` calls of ``energies`` with a fresh 1024-dim ``change_basis`` rep."""
    G = ep.SO2()
    base = ep.Rep.parse(G, "512x0 + 256x1")
    Q = random_orthogonal(base.dim, gen)
    W = torch.randn(2, base.dim, generator=gen)
    out = 2 * G.trivial()
    rss = []
    for k in range(calls):
        P = Q.clone()
        i, j = 1 + k % 1023, 1 + (k // 1023) % 1023
        P[:, [0, i]] = P[:, [i, 0]]
        P[:, [1, j]] = P[:, [j, 1]]
        ep.energies(W, base.change_basis(P), out)
        if k % every == every - 1:
            gc.collect()
            rss.append(rss_bytes())
    return rss


def test_rss_stays_flat_over_calls_with_fresh_1024_dim_reps(gen, monkeypatch):
    """Each call keeps ~24 MiB in the caches (the rep's dense Q, its field basis, the plan); under a
    64 MiB budget per cache, RSS after the caches fill stays within 64 MiB of allocator slack: without
    the byte bound it grows by the same ~24 MiB per call (GiBs over the run)."""
    limit_every_cache(monkeypatch, 64 << 20)
    rss = _rss_over_fresh_1024_dim_reps(gen, 160, 20)
    assert block_plan.cache_info().bytes <= 64 << 20
    assert max(rss) - rss[0] <= 64 << 20, [r >> 20 for r in rss]


@pytest.mark.skipif(os.environ.get("EQUIPROJ_SLOW", "") != "1", reason="10,000 calls take about 20 minutes: each "
                    "fresh 1024-dim Q costs an exact orthogonality check Q^T Q (1024^3); EQUIPROJ_SLOW=1 runs it")
def test_rss_stays_flat_over_10000_calls_with_fresh_1024_dim_reps(gen, monkeypatch):
    limit_every_cache(monkeypatch, 64 << 20)
    rss = _rss_over_fresh_1024_dim_reps(gen, 10_000, 500)
    assert max(rss) - rss[0] <= 64 << 20, [r >> 20 for r in rss]


def test_rss_stays_flat_over_many_calls_with_fresh_reps(gen, monkeypatch):
    """The quick version: fresh 256-dim reps under a 16 MiB budget."""
    limit_every_cache(monkeypatch, 16 << 20)
    G = ep.SO2()
    base = ep.Rep.parse(G, "128x0 + 64x1")
    Q = random_orthogonal(base.dim, gen)
    W = torch.randn(2, base.dim, generator=gen)
    out = 2 * G.trivial()
    rss = []
    for k in range(300):
        P = Q.clone()
        P[:, [0, k % 255 + 1]] = P[:, [k % 255 + 1, 0]]
        P = P * (1.0 if k < 255 else -1.0)
        ep.energies(W, base.change_basis(P), out)
        if k % 50 == 49:
            gc.collect()
            rss.append(rss_bytes())
    assert block_plan.cache_info().bytes <= 16 << 20
    assert max(rss) - rss[0] <= 48 << 20, [r >> 20 for r in rss]


def test_change_basis_applies_the_structured_basis_without_a_dense_product(gen):
    """``change_basis(Q)`` multiplies ``Q`` into each field's small basis (columns permuted where the rep
    is stored permuted): the same as the dense ``Q @ Q_struct``, and the rep's matrices are ``Q rho Q^T``."""
    G = ep.O3()
    small = ep.Rep.parse(G, "1o + 2e")
    changed = small.change_basis(random_orthogonal(small.dim, gen))
    reps = [33 * small, 70 * changed + 3 * small, (changed + ep.Rep.parse(G, "0e")) * 40, ep.Rep.parse(G, "3x0e + 2x1o"),
            ep.Rep.parse(ep.SO2(), "3x0 + 2x1")]
    assert any(r.perm is not None for r in reps) and any(f.Q is not None for r in reps for _, f in r.segments)
    g = G.sample(3, generator=gen)
    for rep in reps:
        Q = random_orthogonal(rep.dim, gen)
        new = rep.change_basis(Q)
        torch.testing.assert_close(new.change_of_basis, Q @ rep.change_of_basis, rtol=0, atol=1e-12)
        if rep.group == G:
            torch.testing.assert_close(new.matrix(g), Q @ rep.matrix(g) @ Q.T, rtol=0, atol=1e-12)


def test_change_basis_keeps_its_own_copy_of_q(gen):
    """A rep made by ``change_basis`` does not change when the caller later writes into their ``Q``."""
    G = ep.SO2()
    for base in [ep.Rep.parse(G, "6x0"), ep.Rep.parse(G, "2x0 + 2x1")]:
        Q = random_orthogonal(base.dim, gen)
        rep = base.change_basis(Q)
        g = G.sample(4, generator=gen)
        before, cob, h = rep.matrix(g).clone(), rep.change_of_basis.clone(), hash(rep)
        original = Q.clone()
        Q.copy_(Q[torch.arange(base.dim).roll(1)])  # still orthogonal, another rep
        torch.testing.assert_close(rep.matrix(g), before, rtol=0, atol=0)
        torch.testing.assert_close(rep.change_of_basis, cob, rtol=0, atol=0)
        assert hash(rep) == h and rep == base.change_basis(original) and rep != base.change_basis(Q)
