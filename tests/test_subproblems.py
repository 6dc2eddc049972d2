"""Every RADMM-3 / RADMM-3L / RADMM-2 update function against its own definition.

The subproblem of a block variable x is ``F(x) = L(..., x, ...) + (tau/2n)||x - x^k||^2`` with L
written term by term in ``helpers.lagrangian3`` / ``helpers.lagrangian2`` (their docstrings state L;
penalties and proximal terms divided by n, the regulariser not). Exact steps must make the
central-difference gradient of ``n F`` vanish (and agree with scipy's L-BFGS on the same objective);
the elementwise prox is checked against a grid (relu, leaky relu) or for stationarity and descent
(tanh, sigmoid); linearized and backtracking steps are checked against finite differences of ``n
L``, the true curvature and the sufficient-decrease rule. Nothing is compared with a stored output
of the library.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    ACTIVATIONS,
    PEN,
    PEN_NONCONVEX,
    aug,
    dsigma,
    fd_grad,
    fd_hessian_quadratic,
    lagrangian2,
    lagrangian3,
    left_value,
    loss_grad_n,
    make_problem,
    random_state2,
    random_state3,
    sigma,
    skip_term,
    tol,
    with_value,
)
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from daskadmm.model import get_activation
from daskadmm.splitting import radmm2, radmm3
from daskadmm.splitting.base import BlockSpec, Options, Penalties, prox_activation

TOL = tol(np.float64)


COMBOS = [(act, bias, kind) for act in ACTIVATIONS for bias in (True, False)
          for kind in ("resnet", "mlp")]
COMBO_IDS = [f"{a}-{'bias' if b else 'nobias'}-{k}" for a, b, k in COMBOS]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def spec_of(prob, i: int, **options) -> BlockSpec:
    return BlockSpec(prob.arch, i, prob.n, Options(**options))


def nF3(prob, states, pen, i, key, xk):
    """n F for variable ``key`` of block i (RADMM-3 Lagrangian + proximal term)."""
    def f(x):
        L = lagrangian3(prob.arch, with_value(states, i, key, x), prob.X, prob.Y, pen)
        return prob.n * L + 0.5 * pen.tau * float(np.sum((x - xk) ** 2))
    return f


def nF2(prob, states, pen, i, key, xk):
    """n F for variable ``key`` of block i (RADMM-2 Lagrangian + proximal term)."""
    def f(x):
        L = lagrangian2(prob.arch, with_value(states, i, key, x), prob.X, prob.Y, pen)
        return prob.n * L + 0.5 * pen.tau * float(np.sum((x - xk) ** 2))
    return f


def assert_stationary(f, x_star, x_k, h=1e-4):
    """The FD gradient of f vanishes at x_star, and is clearly nonzero at x_k (so the check
    discriminates)."""
    g_k = np.abs(fd_grad(f, x_k, h)).max()
    g_star = np.abs(fd_grad(f, x_star, h)).max()
    assert g_k > 1e-3, f"gradient at x^k is already {g_k:.2e}: the check would not discriminate"
    assert g_star <= TOL.fd_grad * max(1.0, g_k), f"|n grad F| = {g_star:.2e} (at x^k {g_k:.2e})"


def lbfgs(f, x0, h=1e-4):
    shape = x0.shape
    res = minimize(lambda v: f(v.reshape(shape)), x0.ravel(),
                   jac=lambda v: fd_grad(f, v.reshape(shape), h).ravel(), method="L-BFGS-B",
                   options={"maxiter": 5000, "gtol": 1e-11, "ftol": 1e-16, "maxcor": 30})
    return res.x.reshape(shape)


# ---------------------------------------------------------------------------------------------
# W: exact ridge step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_update_weights_is_stationary(act, bias, kind):
    prob = make_problem(act, kind, bias)
    states = random_state3(prob)
    for i in range(1, prob.arch.depth + 1):
        st = states[i - 1]
        G, B = radmm3.weight_stats(aug(prob.arch, left_value(prob, states, i)), st["U"],
                                   st["Lam"], PEN.rho)
        W = radmm3.update_weights(st["W"], G, B, PEN, prob.n)
        assert W.shape == st["W"].shape
        assert_stationary(nF3(prob, states, PEN, i, "W", st["W"]), W, st["W"])


@pytest.mark.parametrize(("act", "bias", "kind"),
                         [("relu", True, "resnet"), ("tanh", False, "mlp")])
def test_update_weights_matches_lbfgs(act, bias, kind):
    prob = make_problem(act, kind, bias, depth=3, width=4, n=20)
    states = random_state3(prob, seed=5)
    for i in range(1, prob.arch.depth + 1):
        st = states[i - 1]
        G, B = radmm3.weight_stats(aug(prob.arch, left_value(prob, states, i)), st["U"],
                                   st["Lam"], PEN.rho)
        W = radmm3.update_weights(st["W"], G, B, PEN, prob.n)
        W_oracle = lbfgs(nF3(prob, states, PEN, i, "W", st["W"]), st["W"])
        assert np.linalg.norm(W - W_oracle) <= TOL.oracle * np.linalg.norm(W)


# ---------------------------------------------------------------------------------------------
# U: elementwise prox of the activation penalty, prox of the loss
# ---------------------------------------------------------------------------------------------

def phi_direct(act, u, c, m, beta, kappa):
    return 0.5 * beta * (c - sigma(act, u)) ** 2 + 0.5 * kappa * (u - m) ** 2


def grid_min(obj, centre, radius, points=20001):
    """Elementwise minimum of obj over a grid on [centre - radius, centre + radius]."""
    t = np.linspace(-1.0, 1.0, points)
    best = np.full(centre.shape, np.inf)
    flat_c, flat_r = centre.ravel(), radius.ravel()
    for lo in range(0, flat_c.size, 16):
        sl = slice(lo, lo + 16)
        grid = flat_c[sl, None] + flat_r[sl, None] * t[None, :]
        best.ravel()[sl] = obj(grid, sl).min(axis=1)
    return best


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize(("beta", "kappa"), [(1.0, 1.0), (10.0, 0.1), (0.1, 10.0), (3.0, 0.5)])
def test_prox_activation_piecewise_linear_vs_grid(act, beta, kappa):
    rng = np.random.default_rng(11)
    shape = (6, 40)
    c = rng.uniform(-3, 3, shape)
    m = rng.uniform(-4, 4, shape)
    m[0, :10] = 0.0  # on the kink
    c[1, :10] = m[1, :10]  # the point itself
    u, capped = prox_activation(c, m, beta, kappa, rng.standard_normal(shape),
                                get_activation(act, 0.1))
    assert capped == 0
    # The global minimiser satisfies phi(u*) <= phi(m), so |u* - m| <= sqrt(beta/kappa)|c - s(m)|.
    radius = np.sqrt(beta / kappa) * np.abs(c - sigma(act, m)) + 1e-3
    best = grid_min(lambda g, sl: phi_direct(act, g, c.ravel()[sl, None], m.ravel()[sl, None],
                                             beta, kappa), m, radius)
    got = phi_direct(act, u, c, m, beta, kappa)
    assert np.all(got <= best + TOL.closed_form * (1.0 + np.abs(best)))


def assert_smooth_prox(act, u, u0, c, m, beta, kappa):
    s, ds = sigma(act, u), dsigma(act, u)
    dphi = -beta * (c - s) * ds + kappa * (u - m)
    scale = beta * (np.abs(c) + 1.0) + kappa * (np.abs(u) + np.abs(m))
    assert np.all(np.abs(dphi) <= TOL.stationarity * scale), np.abs(dphi / scale).max()
    p, p0 = phi_direct(act, u, c, m, beta, kappa), phi_direct(act, u0, c, m, beta, kappa)
    assert np.all(p <= p0 + TOL.rounding * np.abs(p0))
    # second-order: a descent method from u0 ends at a local minimum, not a maximum
    h = 1e-4
    d2 = (phi_direct(act, u + h, c, m, beta, kappa) - 2 * p
          + phi_direct(act, u - h, c, m, beta, kappa)) / h**2
    assert np.all(d2 >= -TOL.fd_rel * scale)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize(("beta", "kappa"), [(1.0, 1.0), (10.0, 0.1), (0.1, 10.0), (6.0, 0.45)])
def test_prox_activation_smooth_stationary_and_descent(act, beta, kappa):
    rng = np.random.default_rng(12)
    shape = (6, 40)
    c = rng.uniform(-3, 3, shape)
    m = rng.uniform(-4, 4, shape)
    u0 = rng.uniform(-5, 5, shape)
    # Where phi'' < 0 the solver takes gradient steps 1/L_phi, which converge linearly with rate
    # 1 - kappa/L_phi: from a far start with beta >> kappa that takes more than the default cap
    # of 100 iterations (up to ~800 here), so the cap is raised for the stationarity check.
    u, capped = prox_activation(c, m, beta, kappa, u0, get_activation(act), max_iter=5000)
    assert capped == 0
    assert_smooth_prox(act, u, u0, c, m, beta, kappa)
    # With the default cap: phi never rises, and every element that is not stationary is
    # reported as capped.
    u, capped = prox_activation(c, m, beta, kappa, u0, get_activation(act))
    p, p0 = phi_direct(act, u, c, m, beta, kappa), phi_direct(act, u0, c, m, beta, kappa)
    assert np.all(p <= p0 + TOL.rounding * np.abs(p0))
    dphi = -beta * (c - sigma(act, u)) * dsigma(act, u) + kappa * (u - m)
    scale = beta * (np.abs(c) + 1.0) + kappa * (np.abs(u) + np.abs(m))
    assert np.count_nonzero(np.abs(dphi) > TOL.stationarity * scale) <= capped


def u_objective_hidden(prob, states, pen, i, Wi=None):
    """The U_i subproblem elementwise, from the terms of n L that contain U_i:
    (beta/2)(c - s(u))^2 + Lam (u - z) + (rho/2)(u - z)^2 + (tau/2)(u - u^k)^2."""
    st = states[i - 1]
    Vl = left_value(prob, states, i)
    z = (st["W"] if Wi is None else Wi) @ aug(prob.arch, Vl)
    c = st["V"] - skip_term(prob.arch, i, Vl)
    act = prob.arch.activation

    def obj(u, sl=None):
        # sl: the grid rows (elements sl of the flattened arrays), or None for arrays like U
        def pick(a):
            return a if sl is None else a.ravel()[sl, None]
        cc, zz, ll, uk = pick(c), pick(z), pick(st["Lam"]), pick(st["U"])
        return (0.5 * pen.beta * (cc - sigma(act, u)) ** 2 + ll * (u - zz)
                + 0.5 * pen.rho * (u - zz) ** 2 + 0.5 * pen.tau * (u - uk) ** 2)
    return obj, c, z


@pytest.mark.parametrize("pen", [PEN, PEN_NONCONVEX], ids=["pen", "nonconvex"])
@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_update_preactivation_hidden(act, bias, kind, pen):
    prob = make_problem(act, kind, bias, width=4, n=20)
    states = random_state3(prob, seed=2)
    for i in range(1, prob.arch.depth):
        st = states[i - 1]
        obj, c, z = u_objective_hidden(prob, states, pen, i)
        # beta >> kappa needs a raised Newton cap: see
        # test_prox_activation_smooth_stationary_and_descent
        options = {} if pen is PEN else {"newton_max_iter": 5000}
        U, capped = radmm3.update_preactivation(spec_of(prob, i, **options), pen, st["U"], z,
                                                st["Lam"], c, None)
        assert capped == 0
        kappa = pen.rho + pen.tau
        m = (pen.rho * z - st["Lam"] + pen.tau * st["U"]) / kappa
        if act in ("relu", "leaky_relu"):
            radius = np.sqrt(pen.beta / kappa) * np.abs(c - sigma(act, m)) + 1e-3
            best = grid_min(obj, m, radius)
            got = obj(U)
            assert np.all(got <= best + TOL.closed_form * (1.0 + np.abs(best)))
        else:
            assert_smooth_prox(act, U, st["U"], c, m, pen.beta, kappa)
        # and through the whole Lagrangian: the step does not raise n F
        f = nF3(prob, states, pen, i, "U", st["U"])
        assert f(U) <= f(st["U"]) + TOL.identity * abs(f(st["U"]))


def test_update_preactivation_output_mse_closed_form():
    prob = make_problem("tanh", "resnet", True, loss="mse")
    states = random_state3(prob, seed=3)
    N = prob.arch.depth
    st = states[N - 1]
    Z = st["W"] @ aug(prob.arch, states[N - 2]["V"])
    U, capped = radmm3.update_preactivation(spec_of(prob, N), PEN, st["U"], Z, st["Lam"], None,
                                            prob.Y)
    assert capped == 0
    expected = (prob.Y + PEN.rho * Z - st["Lam"] + PEN.tau * st["U"]) / (1 + PEN.rho + PEN.tau)
    np.testing.assert_allclose(U, expected, rtol=TOL.closed_form, atol=TOL.closed_form)
    assert_stationary(nF3(prob, states, PEN, N, "U", st["U"]), U, st["U"])


@pytest.mark.parametrize("pen", [PEN, PEN_NONCONVEX], ids=["pen", "small-kappa"])
def test_update_preactivation_output_cross_entropy(pen):
    prob = make_problem("relu", "mlp", True, loss="cross_entropy", d_out=3, n=20)
    states = random_state3(prob, seed=4)
    N = prob.arch.depth
    st = states[N - 1]
    Z = st["W"] @ aug(prob.arch, states[N - 2]["V"])
    U, capped = radmm3.update_preactivation(spec_of(prob, N), pen, st["U"], Z, st["Lam"], None,
                                            prob.Y)
    assert capped == 0
    f = nF3(prob, states, pen, N, "U", st["U"])
    assert_stationary(f, U, st["U"])
    U_oracle = lbfgs(f, st["U"])
    assert np.linalg.norm(U - U_oracle) <= TOL.oracle * np.linalg.norm(U)


# ---------------------------------------------------------------------------------------------
# V: exact step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_update_activation_is_stationary(act, bias, kind):
    prob = make_problem(act, kind, bias)
    states = random_state3(prob, seed=6)
    for i in range(1, prob.arch.depth):  # includes i = N-1
        st = states[i - 1]
        V = radmm3.update_activation(spec_of(prob, i), PEN, st["V"], left_value(prob, states, i),
                                     st["U"], states[i])
        assert V.shape == st["V"].shape
        assert_stationary(nF3(prob, states, PEN, i, "V", st["V"]), V, st["V"])


# ---------------------------------------------------------------------------------------------
# Lambda: the dual identity after the U step, and the sign
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_dual_identity_after_u_step(act, bias, kind, loss):
    """Lam^{k+1} = -n grad_U f_i(U^{k+1}) - tau (U^{k+1} - U^k), f_i the beta term (i < N) or
    the loss (i = N); ReLU-like elements exactly at 0 are excluded."""
    prob = make_problem(act, kind, bias, loss=loss, d_out=3)
    states = random_state3(prob, seed=7)
    for i in range(1, prob.arch.depth + 1):
        st = states[i - 1]
        Vl = left_value(prob, states, i)
        Z = st["W"] @ aug(prob.arch, Vl)
        hidden = i < prob.arch.depth
        c = st["V"] - skip_term(prob.arch, i, Vl) if hidden else None
        U, _ = radmm3.update_preactivation(spec_of(prob, i), PEN, st["U"], Z, st["Lam"], c,
                                           None if hidden else prob.Y)
        Lam = radmm3.update_duals(st["Lam"], U, Z, PEN.rho)
        if hidden:
            grad_f = -PEN.beta * (c - sigma(act, U)) * dsigma(act, U)
            keep = U != 0.0 if act in ("relu", "leaky_relu") else np.ones(U.shape, bool)
        else:
            grad_f = loss_grad_n(loss, U, prob.Y)
            keep = np.ones(U.shape, bool)
        expected = -grad_f - PEN.tau * (U - st["U"])
        scale = 1.0 + np.abs(st["Lam"]) + PEN.rho * np.abs(U - Z) + PEN.beta * np.abs(
            c if hidden else prob.Y)
        err = np.abs(Lam - expected) / scale
        assert keep.sum() > 0.5 * keep.size
        assert np.all(err[keep] <= TOL.kkt), err[keep].max()
        # sign: the multiplier moves along the constraint residual U - W V~ (dual ascent)
        dL, r = Lam - st["Lam"], U - Z
        nz = np.abs(r) > TOL.closed_form
        assert np.all(np.sign(dL[nz]) == np.sign(r[nz]))


# ---------------------------------------------------------------------------------------------
# RADMM-3L: linearized W and V steps
# ---------------------------------------------------------------------------------------------

def check_linearized_step(f, xk, x_new, hess):
    """``x_new = x^k - G/(eta + tau)`` with G = grad f(x^k) (f = n L), and eta >= the true
    curvature. Returns the recovered eta."""
    g = fd_grad(f, xk)
    d = x_new - xk
    assert np.linalg.norm(g) > 1e-3
    step = -float(np.sum(d * g)) / float(np.sum(g * g))  # 1/(eta + tau)
    assert step > 0
    assert np.linalg.norm(d + step * g) <= TOL.fd_rel * np.linalg.norm(d)
    eta = 1.0 / step - PEN.tau
    ev = np.linalg.eigvalsh(hess)
    assert eta >= ev[-1] * (1 - TOL.kkt), (eta, ev[-1])  # never shorter than 1/curvature
    assert eta <= ev.sum() * (1 + TOL.kkt)  # and no longer than the trace bound allows
    # the step never raises the subproblem objective, and L decreases by the descent lemma
    f0, f1 = f(xk), f(x_new)
    assert f1 + 0.5 * PEN.tau * float(np.sum(d * d)) <= f0 + TOL.identity * abs(f0)
    assert f1 <= f0 - (eta / 2 + PEN.tau) * float(np.sum(d * d)) + TOL.identity * abs(f0)
    return eta


@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS[::3] + [("tanh", True, "resnet")])
def test_radmm3l_update_weights(act, bias, kind):
    prob = make_problem(act, kind, bias, width=4, n=20)
    states = random_state3(prob, seed=8)
    for i in range(1, prob.arch.depth + 1):
        st = states[i - 1]
        G, B = radmm3.weight_stats(aug(prob.arch, left_value(prob, states, i)), st["U"],
                                   st["Lam"], PEN.rho)
        W = radmm3.update_weights_linearized(st["W"], G, B, PEN, prob.n)

        def nL(x, i=i):
            return prob.n * lagrangian3(prob.arch, with_value(states, i, "W", x), prob.X,
                                        prob.Y, PEN)
        check_linearized_step(nL, st["W"], W, fd_hessian_quadratic(nL, st["W"]))


@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_radmm3l_update_activation(act, bias, kind):
    prob = make_problem(act, kind, bias, width=4, n=20)
    states = random_state3(prob, seed=9)
    for i in range(1, prob.arch.depth):
        st = states[i - 1]
        V = radmm3.update_activation_linearized(spec_of(prob, i), PEN, st["V"],
                                                left_value(prob, states, i), st["U"],
                                                states[i])

        def nL(x, i=i):
            return prob.n * lagrangian3(prob.arch, with_value(states, i, "V", x), prob.X,
                                        prob.Y, PEN)

        # n L is a sum over samples of the same quadratic in each column of V_i: the Hessian is
        # block diagonal with identical blocks, the one of column 0.
        V0 = st["V"]

        def col0(v, V0=V0, nL=nL):
            x = V0.copy()
            x[:, 0] = v[:, 0]
            return nL(x)
        hess = fd_hessian_quadratic(col0, V0[:, :1])
        check_linearized_step(nL, st["V"], V, hess)


# ---------------------------------------------------------------------------------------------
# RADMM-2: backtracking W / V steps, exact V_{N-1} and output steps
# ---------------------------------------------------------------------------------------------

def check_backtracking_step(f, xk, x_new, eta, trials, capped, tau):
    """x_new = x^k - G/(eta + tau) with G = grad f(x^k), and the sufficient-decrease rule
    f(x+) <= f(x^k) + <G, x+ - x^k> + (eta/2)||x+ - x^k||^2 holds; eta/2 fails it (if tried)."""
    assert not capped
    g = fd_grad(f, xk, h=1e-6)
    d = x_new - xk
    assert np.linalg.norm(g) > 1e-3
    assert np.linalg.norm(-(eta + tau) * d - g) <= TOL.fd_rel * np.linalg.norm(g)
    f0, f1 = f(xk), f(x_new)
    dd, gd = float(np.sum(d * d)), float(np.sum(g * d))
    slack = TOL.fd_rel * abs(gd) + TOL.identity * abs(f0)
    assert f1 <= f0 + gd + 0.5 * eta * dd + slack
    # hence L falls by at least (eta/2 + tau)||d||^2 / n
    assert f1 + (0.5 * eta + tau) * dd <= f0 + slack
    if trials > 1:  # the previous trial, eta/2, must have been rejected
        d2 = -g / (0.5 * eta + tau)
        assert f(xk + d2) > f0 + float(np.sum(g * d2)) + 0.25 * eta * float(np.sum(d2 * d2)) \
            - slack


@pytest.mark.parametrize("step", ["backtracking", "lipschitz"])
@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_radmm2_update_weights_hidden(act, bias, kind, step):
    prob = make_problem(act, kind, bias, width=4, n=20)
    states = random_state2(prob, seed=10)
    for i in range(1, prob.arch.depth):
        st = states[i - 1]
        W, eta, trials, capped = radmm2.update_weights_hidden(spec_of(prob, i, step=step), PEN,
                                                              st, left_value(prob, states, i))

        def nL(x, i=i):
            return prob.n * lagrangian2(prob.arch, with_value(states, i, "W", x), prob.X,
                                        prob.Y, PEN)
        check_backtracking_step(nL, st["W"], W, eta, trials, capped, PEN.tau)
        if step == "lipschitz" and act in ("tanh", "sigmoid"):
            # eta_W = beta h ||V~||_2^2 + n lam is a global Lipschitz constant of the gradient
            # of n L in W_i (h = sup sigma'^2 + sup |sigma''| (|c| + sup |sigma|) bounds the
            # curvature of each penalty term; sup |sigma| = 1 for tanh and sigmoid): the first
            # trial is accepted.
            Vt = aug(prob.arch, left_value(prob, states, i))
            c = st["V"] - skip_term(prob.arch, i, left_value(prob, states, i))
            sup_df2, sup_d2f = (1.0, 4 / (3 * np.sqrt(3))) if act == "tanh" else (
                1 / 16, 1 / (6 * np.sqrt(3)))
            h = sup_df2 + sup_d2f * (np.abs(c).max() + 1.0)
            lip = PEN.beta * h * np.linalg.norm(Vt, 2) ** 2 + prob.n * PEN.lam
            assert trials == 1
            assert eta == pytest.approx(lip, rel=TOL.closed_form)


@pytest.mark.parametrize("step", ["backtracking", "lipschitz"])
@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_radmm2_update_activation_hidden(act, bias, kind, step):
    prob = make_problem(act, kind, bias, width=4, n=20)
    states = random_state2(prob, seed=11)
    rng = np.random.default_rng(0)
    for i in range(1, prob.arch.depth - 1):
        st = states[i - 1]
        W_new = st["W"] + 0.1 * rng.standard_normal(st["W"].shape)  # W_i of iteration k+1
        V, eta, trials, capped = radmm2.update_activation(spec_of(prob, i, step=step), PEN, st,
                                                          W_new, left_value(prob, states, i),
                                                          states[i])
        cur = with_value(states, i, "W", W_new)

        def nL(x, i=i, cur=cur):
            return prob.n * lagrangian2(prob.arch, with_value(cur, i, "V", x), prob.X, prob.Y,
                                        PEN)
        check_backtracking_step(nL, st["V"], V, eta, trials, capped, PEN.tau)


@pytest.mark.parametrize(("act", "bias", "kind"), COMBOS, ids=COMBO_IDS)
def test_radmm2_update_activation_last_is_stationary(act, bias, kind):
    prob = make_problem(act, kind, bias)
    states = random_state2(prob, seed=12)
    i = prob.arch.depth - 1
    st = states[i - 1]
    W_new = st["W"] + 0.1 * np.random.default_rng(1).standard_normal(st["W"].shape)
    V = radmm2.update_activation_last(spec_of(prob, i), PEN, st, W_new,
                                      left_value(prob, states, i), states[i])
    cur = with_value(states, i, "W", W_new)
    assert_stationary(nF2(prob, cur, PEN, i, "V", st["V"]), V, st["V"])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_radmm2_output_block_exact(loss):
    """W_N, U_N of RADMM-2 minimise the RADMM-2 Lagrangian (same formulas as RADMM-3)."""
    prob = make_problem("tanh", "resnet", True, loss=loss, d_out=3)
    states = random_state2(prob, seed=13)
    N = prob.arch.depth
    st = states[N - 1]
    Vt = aug(prob.arch, states[N - 2]["V"])
    G, B = radmm3.weight_stats(Vt, st["U"], st["Lam"], PEN.rho)
    W = radmm3.update_weights(st["W"], G, B, PEN, prob.n)
    assert_stationary(nF2(prob, states, PEN, N, "W", st["W"]), W, st["W"])
    cur = with_value(states, N, "W", W)
    U, _ = radmm3.update_preactivation(spec_of(prob, N), PEN, st["U"], W @ Vt, st["Lam"], None,
                                       prob.Y)
    assert_stationary(nF2(prob, cur, PEN, N, "U", st["U"]), U, st["U"])


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_radmm2_capped_backtracking_keeps_xk(act):
    """With one trial and a hopeless eta (remembered eta tiny, tau tiny) the cap is hit and the
    step returns x^k unchanged."""
    prob = make_problem(act, "resnet", True)
    states = random_state2(prob, seed=14)
    pen = Penalties(rho=1.0, beta=1.0, tau=1e-12, lam=0.0)
    spec = spec_of(prob, 2, backtrack_max=1)
    st = dict(states[1], eta_W=np.float64(1e-12), eta_V=np.float64(1e-12))
    Vl = states[0]["V"]
    W, _, trials, capped = radmm2.update_weights_hidden(spec, pen, st, Vl)
    assert capped and trials == 1
    assert np.array_equal(W, st["W"])
    V, _, trials, capped = radmm2.update_activation(spec, pen, st, st["W"], Vl, states[2])
    assert capped and trials == 1
    assert np.array_equal(V, st["V"])
    # with enough trials the doubling finds an acceptable step
    W2, _, trials2, capped2 = radmm2.update_weights_hidden(spec_of(prob, 2, backtrack_max=80),
                                                            pen, st, Vl)
    assert not capped2 and trials2 > 1 and not np.array_equal(W2, st["W"])


# ---------------------------------------------------------------------------------------------
# Limit cases
# ---------------------------------------------------------------------------------------------

def rel(a, b):
    return np.linalg.norm(a - b) / (1.0 + np.linalg.norm(b))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_huge_rho_enforces_the_constraint(act, loss):
    prob = make_problem(act, "resnet", True, loss=loss, d_out=3)
    states = random_state3(prob, seed=15)
    pen = Penalties(rho=1e9, beta=1.0, tau=0.1, lam=0.01)
    for i in range(1, prob.arch.depth + 1):
        st = states[i - 1]
        Vl = left_value(prob, states, i)
        Vt = aug(prob.arch, Vl)
        hidden = i < prob.arch.depth
        G, B = radmm3.weight_stats(Vt, st["U"], st["Lam"], pen.rho)
        W = radmm3.update_weights(st["W"], G, B, pen, prob.n)
        Z = W @ Vt
        c = st["V"] - skip_term(prob.arch, i, Vl) if hidden else None
        U, _ = radmm3.update_preactivation(spec_of(prob, i), pen, st["U"], Z, st["Lam"], c,
                                           None if hidden else prob.Y)
        assert rel(U, Z) <= TOL.limit
        assert rel(st["U"], Z) > 0.1  # it was not satisfied before


def test_huge_lambda_gives_zero_weights():
    lam = 1e10
    pen = Penalties(rho=1.0, beta=1.0, tau=0.1, lam=lam)
    for act in ("relu", "tanh"):
        prob = make_problem(act, "resnet", True)
        s3, s2 = random_state3(prob, seed=16), random_state2(prob, seed=16)
        for i in range(1, prob.arch.depth + 1):
            st = s3[i - 1]
            G, B = radmm3.weight_stats(aug(prob.arch, left_value(prob, s3, i)), st["U"],
                                       st["Lam"], pen.rho)
            for step in (radmm3.update_weights, radmm3.update_weights_linearized):
                W = step(st["W"], G, B, pen, prob.n)
                assert np.linalg.norm(W) <= TOL.limit * np.linalg.norm(st["W"])
            if i < prob.arch.depth:
                W, *_ = radmm2.update_weights_hidden(spec_of(prob, i), pen, s2[i - 1],
                                                     left_value(prob, s2, i))
                assert np.linalg.norm(W) <= TOL.limit * np.linalg.norm(s2[i - 1]["W"])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_huge_tau_keeps_the_iterate(act, loss):
    pen = Penalties(rho=1.3, beta=0.7, tau=1e10, lam=0.01)
    prob = make_problem(act, "resnet", True, loss=loss, d_out=3)
    s3, s2 = random_state3(prob, seed=17), random_state2(prob, seed=17)
    N = prob.arch.depth
    lim = TOL.limit
    for i in range(1, N + 1):
        st = s3[i - 1]
        Vl = left_value(prob, s3, i)
        Vt = aug(prob.arch, Vl)
        G, B = radmm3.weight_stats(Vt, st["U"], st["Lam"], pen.rho)
        for step in (radmm3.update_weights, radmm3.update_weights_linearized):
            assert rel(step(st["W"], G, B, pen, prob.n), st["W"]) <= lim
        hidden = i < N
        c = st["V"] - skip_term(prob.arch, i, Vl) if hidden else None
        U, _ = radmm3.update_preactivation(spec_of(prob, i), pen, st["U"], st["W"] @ Vt,
                                           st["Lam"], c, None if hidden else prob.Y)
        assert rel(U, st["U"]) <= lim
        if hidden:
            for vstep in (radmm3.update_activation, radmm3.update_activation_linearized):
                V = vstep(spec_of(prob, i), pen, st["V"], Vl, st["U"], s3[i])
                assert rel(V, st["V"]) <= lim
            st2, Vl2 = s2[i - 1], left_value(prob, s2, i)
            W, *_ = radmm2.update_weights_hidden(spec_of(prob, i), pen, st2, Vl2)
            assert rel(W, st2["W"]) <= lim
            if i < N - 1:
                V, *_ = radmm2.update_activation(spec_of(prob, i), pen, st2, st2["W"], Vl2, s2[i])
            else:
                V = radmm2.update_activation_last(spec_of(prob, i), pen, st2, st2["W"], Vl2,
                                                  s2[i])
            assert rel(V, st2["V"]) <= lim
