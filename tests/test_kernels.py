"""The fast elementwise kernels against plain, obviously correct formulations kept here.

The activation prox of tanh/sigmoid (a blocked, in-place safeguarded Newton that evaluates sigma
once per element and iteration) must give what the plain formulation gives (every element's
iterates are the same operations, so 1e-12 is far from tight), report the same number of capped
elements, and do it with few sigma evaluations. No timings here: these are the properties the
speed relies on (benchmarks/bench_kernels.py measures the speed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support import load_benchmark

from daskadmm.model import Architecture, get_activation, init_weights
from daskadmm.splitting import BlockSpec, Options, Penalties, base
from daskadmm.splitting.base import prox_activation

# The plain formulations: the old prox, which benchmarks/bench_kernels.py keeps to time the new
# one against (one copy of it in the repository).
_old = load_benchmark("bench_kernels").old_prox_activation


def prox_smooth_plain(c, m, beta, kappa, u0, act, max_iter=100):
    """The safeguarded Newton of prox_activation, written plainly: every iteration gathers the
    active elements and evaluates sigma, sigma', sigma'' at them (three evaluations), then a
    halving line search (one per trial)."""
    assert not act.piecewise_linear
    return _old(c, m, beta, kappa, u0, act, max_iter)


def prox_piecewise_plain(c, m, beta, kappa, act):
    """The two branch candidates, the one with the smaller phi (ties to u+)."""
    assert act.piecewise_linear
    return _old(c, m, beta, kappa, None, act)[0]


PENALTIES = [(1.0, 2.001), (10.0, 0.1), (0.1, 10.0), (6.0, 0.45), (1e3, 1e-3), (1e-3, 1e3)]


def hard_inputs(rng, shape):
    """Random c, m, u0 with the hard cases planted: saturated sigma (large |m|, |u0|), targets
    out of sigma's range, u and m near 0, starts far away, c = m = 0, NaN."""
    c = rng.uniform(-3, 3, shape)
    m = rng.uniform(-4, 4, shape)
    u0 = rng.uniform(-5, 5, shape)
    f = (c.ravel(), m.ravel(), u0.ravel())
    f[1][:40] = rng.choice([-1, 1], 40) * rng.uniform(15, 40, 40)  # saturated
    f[2][:40] = f[1][:40] * 1.5
    f[0][40:80] = rng.choice([-1, 1], 40) * rng.uniform(1.0, 1.5, 40)  # c at / beyond +-1
    f[1][80:120] = rng.standard_normal(40) * 1e-10  # u near 0
    f[0][80:120] = rng.standard_normal(40) * 1e-10
    f[2][80:120] = rng.standard_normal(40) * 1e-12
    f[0][120:130] = 0.0
    f[1][120:130] = 0.0
    f[2][130:170] *= 20.0  # far starts
    f[2][170:200] = f[1][170:200]  # starting at m
    f[0][200] = np.nan
    return c, m, u0


def on_and_off(monkeypatch, run, *args):
    """``run(*args)`` with the compiled kernels (splitting.fused), then with the NumPy
    formulation: both results."""
    from daskadmm.splitting import fused

    got = []
    for compiled in (True, False):
        monkeypatch.setattr(fused, "AVAILABLE", compiled)
        got.append(run(*args))
    return got


def assert_same_bits(a, b, dtype=None):
    """``a`` and ``b`` equal bit for bit (NaN payloads and signed zeros included), both of
    ``dtype`` when given."""
    if dtype is not None:
        assert a.dtype == b.dtype == dtype
    bits = np.uint64 if a.dtype.itemsize == 8 else np.uint32
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(bits),
                                  np.ascontiguousarray(b).view(bits))


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid"])
@pytest.mark.parametrize(("beta", "kappa"), PENALTIES)
@pytest.mark.parametrize("max_iter", [100, 1, 3, 5000])
def test_smooth_prox_equals_plain_formulation(act_name, beta, kappa, max_iter):
    rng = np.random.default_rng(abs(hash((act_name, beta, kappa, max_iter))) % 2**32)
    act = get_activation(act_name)
    shape = (7, 3001)  # not a multiple of the block size: a partial last block
    c, m, u0 = hard_inputs(rng, shape)
    ref, ref_capped = prox_smooth_plain(c, m, beta, kappa, u0, act, max_iter)
    sig = np.empty(shape)
    u, capped = prox_activation(c, m, beta, kappa, u0, act, max_iter, sigma_out=sig)
    assert u.shape == shape and u is not u0
    np.testing.assert_allclose(u, ref, rtol=1e-12, atol=0.0)
    assert capped == ref_capped  # the cap is reported the same way
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(sig, act.f(u))  # sigma of the result, bit for bit
    assert u.ravel()[200] == u0.ravel()[200]  # c = NaN: the line search stalls at u0
    out = np.empty(shape)
    u2, capped2 = prox_activation(c, m, beta, kappa, u0, act, max_iter, out=out)
    assert np.shares_memory(u2, out) and capped2 == capped
    np.testing.assert_array_equal(u2, u)


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_iter", [100, 1, 3])
def test_compiled_smooth_prox_gives_the_numpy_formulations_bits(monkeypatch, act_name, dtype,
                                                                 max_iter):
    """With Numba the smooth prox's arithmetic runs compiled (splitting.fused); every result,
    sigma and cap count is bit for bit the NumPy formulation's, at every penalty, in float32
    too, with hard inputs (saturation, NaN, line searches that stall, capped elements)."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    rng = np.random.default_rng(11)
    act = get_activation(act_name)
    c, m, u0 = (x.astype(dtype) for x in hard_inputs(rng, (5, 4001)))

    def run(beta, kappa):
        sig = np.empty_like(c)
        u, capped = prox_activation(c, m, beta, kappa, u0, act, max_iter, sigma_out=sig)
        return u, sig, capped

    # NumPy float64 penalties too (a scikit-learn grid): the same bits as Python floats'
    for beta, kappa in [*PENALTIES, (np.float64(0.3), np.float64(1.7))]:
        (u1, s1, k1), (u2, s2, k2) = on_and_off(monkeypatch, run, beta, kappa)
        assert_same_bits(u1, u2, dtype)
        assert_same_bits(s1, s2)
        assert k1 == k2
    sig = np.empty_like(c)
    u_np, _ = prox_activation(c, m, np.float64(0.3), np.float64(1.7), u0, act, max_iter,
                              sigma_out=sig)
    u_py, _ = prox_activation(c, m, 0.3, 1.7, u0, act, max_iter)
    assert_same_bits(u_np, u_py)


@pytest.mark.parametrize("max_iter", [0, 1, 5, 100])
def test_compiled_prox_reads_its_start_in_place_or_from_a_copy_with_the_same_bits(
        monkeypatch, max_iter):
    """The compiled prox reads a C-contiguous start of the problem's type where it is (no copy
    into the result first) and copies any other (Fortran-ordered, strided, another float
    type); either way, with or without ``out``, the NumPy formulation's bits, every element
    written (no iteration at all included, and NaN and infinite starts), and the start left as
    it was."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    from daskadmm.splitting import fused

    rng = np.random.default_rng(21)
    act = get_activation("tanh")
    c, m, u0 = hard_inputs(rng, (7, 3001))
    u0 = u0.astype(np.float32).astype(np.float64)  # exact in float32 too
    u0.ravel()[201:204] = [np.nan, np.inf, -np.inf]
    keep = u0.copy()
    monkeypatch.setattr(fused, "AVAILABLE", False)
    ref, k_ref = prox_activation(c, m, 1.0, 2.001, u0, act, max_iter)  # NumPy formulation
    monkeypatch.setattr(fused, "AVAILABLE", True)
    if max_iter == 0:
        assert_same_bits(ref, u0)
    wide = np.zeros((7, 6002))
    wide[:, ::2] = u0
    for start in (u0, np.asfortranarray(u0), u0.astype(np.float32), wide[:, ::2]):
        out = np.full(c.shape, 7.0)  # every element must be written
        sig = np.full(c.shape, 7.0)
        u, k = prox_activation(c, m, 1.0, 2.001, start, act, max_iter, out=out, sigma_out=sig)
        assert np.shares_memory(u, out)
        assert_same_bits(u, ref)
        assert k == k_ref
        assert_same_bits(sig, np.tanh(ref))
        np.testing.assert_array_equal(u0, keep)
    u_new, _ = prox_activation(c, m, 1.0, 2.001, u0, act, max_iter)  # no out: a new array
    assert not np.shares_memory(u_new, u0)
    assert_same_bits(u_new, ref)


def test_a_numba_that_does_not_import_falls_back_to_numpy(monkeypatch):
    """Numba installed but broken (e.g. too old for NumPy): the NumPy formulation runs."""
    from daskadmm.splitting import fused

    monkeypatch.setattr(fused, "AVAILABLE", True)
    monkeypatch.setattr(fused, "_COMPILED", None)
    monkeypatch.setitem(__import__("sys").modules, "numba", None)  # import raises
    c, m, u0 = hard_inputs(np.random.default_rng(4), (3, 300))
    act = get_activation("tanh")
    u, capped = prox_activation(c, m, 1.0, 2.0, u0, act, 7)
    assert fused.AVAILABLE is False
    expected = prox_smooth_plain(c, m, 1.0, 2.0, u0, act, 7)
    np.testing.assert_allclose(u, expected[0], rtol=1e-12, atol=0.0)
    assert capped == expected[1]


def test_the_compiled_prox_is_used_when_numba_is_installed(monkeypatch):
    """The fused kernels run (and the NumPy block solver does not) when Numba is there."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    from daskadmm.splitting import fused

    monkeypatch.setattr(fused, "AVAILABLE", True)
    calls = []
    monkeypatch.setattr(base, "_prox_smooth_block", lambda *a: calls.append(a) or 0)
    c, m, u0 = hard_inputs(np.random.default_rng(2), (3, 300))
    prox_activation(c, m, 1.0, 2.0, u0, get_activation("tanh"))
    assert calls == []


@pytest.mark.parametrize("block", [1, 5, 64, 1 << 20])
def test_smooth_prox_does_not_depend_on_the_blocking(monkeypatch, block):
    rng = np.random.default_rng(3)
    act = get_activation("tanh")
    c, m, u0 = hard_inputs(rng, (5, 211))
    u_default, cap_default = prox_activation(c, m, 6.0, 0.45, u0, act, 7)
    monkeypatch.setattr(base, "_BLOCK", block)
    u, cap = prox_activation(c, m, 6.0, 0.45, u0, act, 7)
    np.testing.assert_array_equal(u, u_default)
    assert cap == cap_default


class _Counting:
    """Counts the elements at which an activation's kernels are evaluated."""

    def __init__(self, act):
        self.evals = 0
        self.slow = 0
        self.act = act

    def wrap(self):
        act = self.act

        def f_into(u, out):
            self.evals += u.size
            return act.f_into(u, out)

        def slow(fn):
            def g(u):
                self.slow += u.size
                return fn(u)
            return g

        return dataclasses.replace(act, f=slow(act.f), df=slow(act.df), d2f=slow(act.d2f),
                                   f_into=f_into)


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid"])
def test_smooth_prox_evaluates_sigma_about_once_per_iteration(act_name):
    """A warm start (as in ADMM: u0 = the previous iterate, near the solution) converges in a
    few Newton steps; sigma is evaluated once at u0 and once per step and element (the plain
    formulation: three times per step plus once per line-search trial)."""
    rng = np.random.default_rng(5)
    act = get_activation(act_name)
    n = 20000
    c, m = rng.uniform(-0.9, 0.9, n), rng.uniform(-2, 2, n)
    beta, kappa = 1.0, 2.001
    sol, _ = prox_smooth_plain(c, m, beta, kappa, m, act, 1000)
    u0 = sol + 0.05 * rng.standard_normal(n)
    counter = _Counting(act)
    u, capped = prox_activation(c, m, beta, kappa, u0, counter.wrap())
    assert capped == 0
    assert counter.slow == 0  # act.f, df, d2f: not used by the fast path
    per_element = counter.evals / n
    plain = _Counting(act)
    prox_smooth_plain(c, m, beta, kappa, u0, plain.wrap())
    plain_per_element = plain.slow / n
    assert per_element <= 5.0, per_element
    assert per_element <= 0.4 * plain_per_element, (per_element, plain_per_element)


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize(("beta", "kappa"), PENALTIES)
def test_piecewise_prox_equals_plain_formulation(act_name, beta, kappa):
    rng = np.random.default_rng(7)
    act = get_activation(act_name, 0.1)
    shape = (9, 2001)
    c, m, u0 = hard_inputs(rng, shape)
    c.ravel()[:30] = m.ravel()[:30]  # ties
    m.ravel()[30:60] = 0.0
    sig = np.empty(shape)
    u, capped = prox_activation(c, m, beta, kappa, u0, act, sigma_out=sig)
    assert capped == 0
    np.testing.assert_array_equal(u, prox_piecewise_plain(c, m, beta, kappa, act))
    np.testing.assert_array_equal(sig, act.f(u))
    out = np.empty(shape)
    u2, _ = prox_activation(c, m, beta, kappa, u0, act, out=out)
    assert np.shares_memory(u2, out)
    np.testing.assert_array_equal(u2, u)


@pytest.mark.parametrize(("act_name", "slope"), [("relu", 0.01), ("leaky_relu", 0.1),
                                               ("leaky_relu", 1.5), ("leaky_relu", -0.2),
                                               ("identity", 0.01)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_piecewise_prox_gives_the_numpy_formulations_bits(monkeypatch, act_name,
                                                                    slope, dtype):
    """With Numba the piecewise-linear prox (relu, leaky_relu of every slope kind, identity)
    and sigma of its result run in one compiled loop: bit for bit the NumPy formulation's,
    signed zeros, ties, infinities and NaN included, in float32 too, with sigma written into a
    C-ordered array directly and into any other through act.f."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    rng = np.random.default_rng(21)
    act = get_activation(act_name, slope)
    c, m, u0 = (x.astype(dtype) for x in hard_inputs(rng, (7, 3001)))
    c.ravel()[:40] = m.ravel()[:40]  # ties
    m.ravel()[40:80] = 0.0
    c.ravel()[80:120] = -0.0
    m.ravel()[100:140] = -0.0
    c.ravel()[140:150] = np.inf
    m.ravel()[150:160] = -np.inf
    c.ravel()[160:170] = np.nan

    def run(beta, kappa):
        sig = np.empty_like(c)
        sig_f = np.empty_like(c, order="F")
        with np.errstate(all="ignore"):  # the planted infinities and NaN
            u, capped = prox_activation(c, m, beta, kappa, u0, act, sigma_out=sig)
            u_f, _ = prox_activation(c, m, beta, kappa, u0, act, sigma_out=sig_f,
                                     out=np.empty_like(c))
        return u, sig, u_f, sig_f, capped

    for beta, kappa in [*PENALTIES, (np.float64(0.3), np.float64(1.7))]:
        for a, b in zip(*on_and_off(monkeypatch, run, beta, kappa), strict=True):
            if isinstance(a, np.ndarray):
                assert_same_bits(a, b, dtype)
            else:
                assert a == b == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_u_step_target_compiled_gives_the_numpy_bits(monkeypatch, dtype):
    """``m = ((Z rho - Lam) + U tau) / kappa`` in one compiled loop equals the NumPy passes
    bit for bit (NumPy float64 penalties too); non-contiguous input takes the NumPy path."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    from daskadmm.splitting.radmm3 import preactivation_target

    rng = np.random.default_rng(5)
    Z, Lam, U = (x.astype(dtype) for x in hard_inputs(rng, (6, 2001)))

    def run(rho, tau):
        return preactivation_target(Z, Lam, U, rho, tau, np.empty_like(Z))

    for rho, tau in [(2.0, 1e-3), (np.float64(0.37), np.float64(0.011))]:
        got = on_and_off(monkeypatch, run, rho, tau)
        assert_same_bits(got[0], got[1])
        strided = preactivation_target(Z, Lam, np.asfortranarray(U), rho, tau,
                                       np.empty_like(Z))
        assert_same_bits(strided, got[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("skip", [True, False])
def test_radmm3a_compiled_combinations_give_the_numpy_bits(monkeypatch, dtype, skip):
    """RADMM-3A's over-relaxed combinations, prox target and multiplier steps: compiled (one
    loop each) and in NumPy, bit for bit, with and without the skip connection (block 1's
    ``Vleft`` is X, of another shape, and is not read)."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    from daskadmm.splitting import radmm3a

    rng = np.random.default_rng(8)
    arch = Architecture("resnet", 3, 5, 4, 2, "relu")
    spec = BlockSpec(arch, 2 if skip else 1, 301, Options(relax=1.8))
    assert bool(spec.s) == skip
    pen = Penalties(rho=2.0, beta=np.float64(0.7), tau=1e-3, lam=0.03)
    Z, U, V, G, S = (x.astype(dtype) for x in (*hard_inputs(rng, (4, 301)),
                                               *hard_inputs(rng, (4, 301))[:2]))
    Vleft = V[::-1].copy() if skip else rng.standard_normal((5, 301)).astype(dtype)
    got = on_and_off(monkeypatch, lambda: [
        radmm3a.relaxed_product(spec, Z, U),
        radmm3a.relaxed_activation(spec, S, V, Vleft),
        radmm3a.prox_target(spec, pen, V, Vleft, G),
        radmm3a.update_multiplier(pen, G, U),
        radmm3a.update_multiplier_at(spec, pen, G, V, Vleft, S)])
    for a, b in zip(*got, strict=True):
        assert_same_bits(a, b, dtype)
    # the multiplier step at the residual is update_multiplier at activation_residual
    p = radmm3a.activation_residual(spec, V, Vleft, U, S)
    assert_same_bits(got[0][4], radmm3a.update_multiplier(pen, G, p))


@pytest.mark.parametrize(("variant", "act_name", "dtype"), [
    ("radmm3", "relu", np.float64), ("radmm3a", "relu", np.float64),
    ("radmm3a", "tanh", np.float64), ("radmm3", "leaky_relu", np.float64),
    ("radmm3", "tanh", np.float64), ("radmm3", "tanh", np.float32),
    ("radmm3a", "tanh", np.float32)])
def test_a_sweep_with_the_compiled_kernels_gives_the_numpy_bits(monkeypatch, variant,
                                                                 act_name, dtype):
    """Whole iterations of the serial reference, compiled kernels on and off: the same bits,
    states and statistics (objective, residuals) alike (resnet with a bias, cross-entropy;
    RADMM-3A over-relaxed; float64 and float32)."""
    pytest.importorskip("numba", reason="the compiled path needs the fast extra")
    from daskadmm.algorithms import get_algorithm
    from daskadmm.engines import reference

    rng = np.random.default_rng(3)
    n = 700
    arch = Architecture("resnet", 4, 6, 8, 3, act_name, loss="cross_entropy")
    X = rng.standard_normal((6, n)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, n)].T.copy()
    sp = get_algorithm(variant).splitting
    pen = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=0.03)
    specs = [BlockSpec(arch, i, n, Options(relax=1.8)) for i in range(1, 5)]
    w0 = [w.astype(dtype) for w in init_weights(arch, rng)]

    def run():
        outs = reference.initial_outputs(sp, sp.init_state(arch, [w.copy() for w in w0], X, Y))
        for _ in range(3):
            outs, stats = reference.sweep(sp, specs, pen, outs, X, Y)
        states = [v for blk in reference.block_states(sp, outs) for v in blk.values()]
        assert all(v.dtype == dtype for v in states)
        return states + [np.array([s[k] for s in stats for k in sorted(s)])]

    for a, b in zip(*on_and_off(monkeypatch, run), strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_activation_kernels_equal_the_plain_functions(name):
    rng = np.random.default_rng(9)
    act = get_activation(name)
    u = np.concatenate([rng.standard_normal(5000) * 4, [0.0, -0.0, 40.0, -40.0, 800.0, -800.0,
                                                         1e-300, -1e-300, np.nan]])
    s, ds, d2 = np.empty_like(u), np.empty_like(u), np.empty_like(u)
    act.f_into(u, s)
    act.derivs_from_value(s, ds, d2)
    np.testing.assert_array_equal(s, act.f(u))
    np.testing.assert_array_equal(ds, act.df(u))
    np.testing.assert_array_equal(d2, act.d2f(u))


# ------------------------------------------------------------------ the RADMM-3 block update


def test_spd_solve_of_c_ordered_rhs_is_c_ordered_and_equals_potrs():
    """Few C-ordered right-hand sides go through triangular solves on R^T (no transposing
    copies) and come back in R's order; many go through the inverse and one product."""
    rng = np.random.default_rng(11)
    d = 37
    A = rng.standard_normal((d, d))
    M = A @ A.T + 0.5 * np.eye(d)
    # few columns (< d/2): triangular solves
    R = rng.standard_normal((d, 15))
    R0 = R.copy()
    X = base.spd_solve(M, R)
    assert X.flags.c_contiguous and np.array_equal(R, R0)  # R kept without overwrite_r
    ref = np.linalg.solve(M, R0)
    np.testing.assert_allclose(X, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # a chunk of the columns gives those columns of the whole, bit for bit
    np.testing.assert_array_equal(base.spd_solve(M, np.ascontiguousarray(R0[:, 3:9])),
                                  X[:, 3:9])
    X2 = base.spd_solve(M, R, overwrite_r=True)
    assert np.shares_memory(X2, R) and np.array_equal(X2, X)
    # Fortran-ordered right-hand sides (the W step's) still go through potrs
    XF = base.spd_solve(M, np.asfortranarray(R0))
    np.testing.assert_allclose(XF, X, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_spd_solve_with_many_right_hand_sides_uses_the_inverse():
    """At least d/2 C-ordered columns (the V steps): X = M^{-1} R into ``out``, R kept, the
    inverse exactly symmetric, and the same solution as the triangular solves to rounding."""
    rng = np.random.default_rng(12)
    d, n = 37, 501
    A = rng.standard_normal((d, d))
    M = A @ A.T + 0.5 * np.eye(d)
    Mi = base.spd_inverse(M)
    assert np.array_equal(Mi, Mi.T)
    np.testing.assert_allclose(Mi @ M, np.eye(d), atol=1e-10)
    R = rng.standard_normal((d, n))
    R0 = R.copy()
    out = np.empty_like(R)
    X = base.spd_solve(M, R, overwrite_r=True, out=out)
    assert X is out and np.array_equal(R, R0) and X.flags.c_contiguous
    np.testing.assert_array_equal(X, Mi @ R0)
    ref = np.linalg.solve(M, R0)
    np.testing.assert_allclose(X, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # the triangular solves, column by column (few columns each), agree to rounding
    tri = np.hstack([base.spd_solve(M, np.ascontiguousarray(R0[:, j:j + 10]))
                     for j in range(0, n, 10)])
    assert np.abs(tri - X).max() <= 1e-12 * np.abs(X).max()
    # float32 stays float32
    X32 = base.spd_solve(M.astype(np.float32), R0.astype(np.float32))
    assert X32.dtype == np.float32
    np.testing.assert_allclose(X32, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n", [5, 501])
def test_spd_solve_of_a_matrix_that_is_not_spd_is_nan(n):
    """Both paths answer NaN (the run then stops as nonfinite) instead of raising."""
    rng = np.random.default_rng(13)
    M = -np.eye(6)
    R = rng.standard_normal((6, n))
    assert np.isnan(base.spd_solve(M, R)).all()
    M2 = np.eye(6)
    M2[0, 0] = np.inf
    assert np.isnan(base.spd_solve(M2, R)).all()
    assert np.isnan(base.spd_inverse(-np.eye(3))).all()


@pytest.mark.parametrize("act_name", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_block_update_keeps_c_order_and_its_objective_equals_the_recomputed_one(act_name, bias):
    """The state stays C-ordered (mixing C and Fortran order makes every elementwise operation
    much slower), and the objective computed from the reused U - Z and sigma(U) is the one
    block_objective computes from scratch, bit for bit."""
    from daskadmm.model import Architecture, init_weights
    from daskadmm.splitting import BlockSpec, Penalties, radmm3

    rng = np.random.default_rng(13)
    arch = Architecture("resnet", 4, 6, 9, 3, act_name, bias=bias, loss="cross_entropy")
    n = 257
    X = rng.standard_normal((6, n))
    Y = np.eye(3)[rng.integers(0, 3, n)].T.copy()
    states = radmm3.init_state(arch, init_weights(arch, rng), X, Y)
    for st in states:  # not forward-consistent: every term is active
        for key in ("U", "Lam", "V"):
            if key in st:
                st[key] = st[key] + 0.3 * rng.standard_normal(st[key].shape)
    pen = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=0.01)
    left = X
    for i in range(1, 5):
        spec = BlockSpec(arch, i, n)
        right = states[i] if i < 4 else None
        new, stats = radmm3.block_update(spec, pen, states[i - 1], left, right,
                                         Y if i == 4 else None)
        assert all(v.flags.c_contiguous for v in new.values())
        assert stats["objective"] == radmm3.block_objective(spec, pen, new, left,
                                                            Y if i == 4 else None)
        r = new["U"] - new["W"] @ spec.aug(left)
        assert stats["primal_sq"] == float(np.sum(r * r))
        if i < 4:
            assert stats["dual_sq"] == float(np.sum((new["V"] - states[i - 1]["V"]) ** 2))
            left = new["V"]


def test_bench_kernels_smoke(tmp_path):
    """The benchmark runs on a tiny plan and writes what the README reads from it."""
    import json

    from support import load_benchmark

    bench = load_benchmark("bench_kernels")
    out = tmp_path / "k.json"
    bench.main(["--widths", "12", "--activations", "tanh", "relu", "--n", "300", "--depth", "3",
                "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["activation"] for r in data["rows"]] == ["tanh", "relu"]
    for r in data["rows"]:
        assert r["flops"] > 0 and r["matmul_rate_best"] > 0 and r["loadavg"]
        assert {"new", "old", "old_prox", "prox"} <= set(r)
        assert 0 < r["new"]["fraction"] and r["old"]["fraction_executed"] > r["old"]["fraction"]
        assert r["max_rel_diff_old_vs_new"] < 1e-8  # the same iterates, up to rounding
        assert r["prox"]["max_rel_diff"] < 1e-12


def test_bench_dtype_smoke(tmp_path):
    """The float32/float64 benchmark runs on a tiny plan; its float32 sweep stays float32 (the
    script asserts it) and both types are timed."""
    import json

    from support import load_benchmark

    bench = load_benchmark("bench_dtype")
    out = tmp_path / "d.json"
    bench.main(["--widths", "12", "--activations", "tanh", "--n", "300", "--depth", "3",
                "--repeats", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["float32"]["state_bytes"] * 2 == row["float64"]["state_bytes"]
    assert row["float32"]["best"] > 0 and row["float64"]["fraction"] > 0
    assert row["speedup_pairs_median"] > 0 and row["loadavg"]


@pytest.mark.parametrize(("d", "scale", "kappa"), [(10, 1.0, 2.001), (10, 30.0, 2.001),
                                                   (3, 5.0, 0.01), (50, 10.0, 1e-3),
                                                   (2, 100.0, 1e3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_newton_step_equals_the_dense_solve(d, scale, kappa, dtype):
    """The output prox's Newton step through Sherman-Morrison (O(d) per column) equals the
    batched dense solve of ``(diag(p) - p p^T + kappa I) x = g`` to the rounding of its
    condition number, near-one-hot columns included, and keeps the arrays' type. (The step
    takes ``sum(p) = 1`` exactly, the dense matrix the rounded ``p``; they differ by about
    ``|1 - sum(p)| / kappa``, hence the ``1/kappa``.)"""
    from daskadmm.model import softmax
    from daskadmm.splitting.base import _ce_newton_step

    rng = np.random.default_rng(d)
    p = softmax(rng.standard_normal((d, 500)) * scale).astype(dtype)
    g = rng.standard_normal((d, 500)).astype(dtype)
    P = p.astype(np.float64)
    H = (P.T[:, :, None] * np.eye(d)[None] - P.T[:, :, None] * P.T[:, None, :]
         + kappa * np.eye(d)[None])
    ref = np.linalg.solve(H, g.astype(np.float64).T[:, :, None])[:, :, 0].T
    got = _ce_newton_step(p, g, kappa)
    assert got.dtype == dtype
    eps = np.finfo(dtype).eps
    err = np.abs(got - ref).max(axis=0) / np.abs(ref).max(axis=0)
    assert np.all(err <= 10 * eps * np.linalg.cond(H) * (1 + 1 / kappa))
