"""dlADMM (Wang et al., KDD 2019) against its own definition.

The augmented Lagrangian of the relaxed problem is written term by term below
(:func:`lagrangian`), independently of ``daskadmm.splitting.dladmm``. Each update is checked
against it: quadratic-approximation steps (W, a) against central differences of ``n L`` and
the sufficient-decrease rule, b for exactness, ReLU z against a brute-force grid, smooth z for
stationarity, the output z for the optimality of its prox. Whole backward / forward tasks must
never raise L (the multiplier step raises it by exactly ``||du||^2/(rho n)``); on a small
problem the residual and L converge; runs are deterministic; digits trains.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from helpers import aug, fd_grad, forward_objective, loss, make_problem, sigma, skip_term
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.algorithms import get_algorithm
from daskadmm.api import schedule_options
from daskadmm.config import AlgorithmConfig, RunConfig, variant_config
from daskadmm.data import load_dataset
from daskadmm.engines.reference import initial_objective, solve
from daskadmm.model import Architecture, get_activation, init_weights
from daskadmm.monitor import Monitor
from daskadmm.schedules import PenaltySchedule
from daskadmm.splitting import LEFT, RIGHT, SELF, Input
from daskadmm.splitting import dladmm as dl
from daskadmm.splitting.base import BlockSpec, Options, Penalties

PEN = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=0.05, nu=0.7)
LEAKY = 0.1


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------------------------------------
# The relaxed augmented Lagrangian, term by term
# ---------------------------------------------------------------------------------------------

def nu_of(pen: Penalties) -> float:
    return pen.rho if pen.nu is None else pen.nu


def lagrangian(arch, states, X, Y, pen) -> float:
    """L = l(z_L; Y) + (lam/2) sum ||W_l||^2
    + (nu/2n) sum_{l<L} (||z_l - W_l a~_{l-1}||^2 + ||a_l - s_l a_{l-1} - sigma(z_l)||^2)
    + <u, z_L - W_L a~_{L-1}>/n + (rho/2n)||z_L - W_L a~_{L-1}||^2."""
    n, N, nu = X.shape[1], arch.depth, nu_of(pen)
    a = [X] + [states[i]["a"] for i in range(N - 1)]
    total = loss(arch.loss, states[N - 1]["z"], Y)
    for i in range(1, N + 1):
        st = states[i - 1]
        total += 0.5 * pen.lam * float(np.sum(st["W"] ** 2))
        r = st["z"] - st["W"] @ aug(arch, a[i - 1])
        if i < N:
            p = a[i] - skip_term(arch, i, a[i - 1]) - sigma(arch.activation, st["z"])
            total += 0.5 * nu * (float(np.sum(r * r)) + float(np.sum(p * p))) / n
        else:
            total += float(np.sum(st["u"] * r)) / n + 0.5 * pen.rho * float(np.sum(r * r)) / n
    return total


def random_state(prob, seed=1) -> list[dict]:
    """A state that is not forward-consistent: every term of L is active."""
    rng = np.random.default_rng(seed)
    states = dl.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    for st in states:
        for key in ("W", "z", "a", "u"):
            if key in st:
                st[key] = st[key] + 0.4 * rng.standard_normal(st[key].shape)
    return states


def specs_of(prob, options=None):
    options = options or Options()
    return [BlockSpec(prob.arch, i, prob.n, options) for i in range(1, prob.arch.depth + 1)]


def left_a(prob, states, i):
    return prob.X if i == 1 else states[i - 2]["a"]


def replace(states, i, key, value):
    new = [dict(s) for s in states]
    new[i - 1][key] = value
    return new


def sufficient_decrease(f, x0, x1, grad, theta, rtol=1e-12) -> bool:
    d = x1 - x0
    return f(x1) <= f(x0) + float(np.sum(grad * d)) + 0.5 * theta * float(np.sum(d * d)) \
        + rtol * abs(f(x0))


# ---------------------------------------------------------------------------------------------
# Registration and wiring
# ---------------------------------------------------------------------------------------------

def test_registered_with_a_backward_and_a_forward_step():
    sp = get_algorithm("dladmm").splitting
    assert [s.name for s in sp.steps] == ["dladmm_backward", "dladmm_forward"]
    bwd, fwd = sp.steps
    assert bwd.order == "descending" and fwd.order == "ascending"
    assert bwd.inputs == (Input(SELF, "dladmm_forward", 1), Input(LEFT, "dladmm_forward", 1, "a"),
                          Input(RIGHT, "dladmm_backward", 0))
    assert fwd.inputs == (Input(SELF, "dladmm_backward", 0), Input(SELF, "dladmm_forward", 1),
                          Input(LEFT, "dladmm_forward", 0, "a"), Input(RIGHT, "dladmm_backward", 0))
    assert sp.objective_left == "a"


# ---------------------------------------------------------------------------------------------
# Backtracking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shrink", [0.0, 0.3])
def test_quad_theta_accepts_the_first_doubling_with_sufficient_decrease(shrink):
    # a quadratic phi plus (shrink/2)||x||^2: the exact test (curv <= theta sq) decides the
    # same as evaluating the paper's condition phi(x+) <= P(x+; theta)
    rng = np.random.default_rng(0)
    H = rng.standard_normal((6, 6))
    H = H @ H.T + np.eye(6)
    x0 = rng.standard_normal(6)

    def f(x):
        return 0.5 * float(x @ H @ x)

    grad = H @ x0
    h = grad + shrink * x0
    theta, trials, capped = dl.quad_theta(float(h @ H @ h), float(h @ h), 1e-3, 40)
    assert not capped and trials > 1
    assert theta == 1e-3 * 2 ** (trials - 1)

    def step(t):
        return (t * x0 - grad) / (t + shrink)

    x1 = step(theta)
    assert sufficient_decrease(f, x0, x1, grad, theta, rtol=1e-12)
    assert not sufficient_decrease(f, x0, step(theta / 2), grad, theta / 2)
    assert f(x1) + 0.5 * shrink * x1 @ x1 < f(x0) + 0.5 * shrink * x0 @ x0


def test_quad_theta_caps_and_rejects_non_finite_sums():
    assert dl.quad_theta(100.0, 1.0, 1.0, 3) == (4.0, 3, True)
    assert dl.quad_theta(float("nan"), 1.0, 1.0, 5)[2]
    assert dl.quad_theta(0.0, 0.0, 2.0, 5) == (2.0, 1, False)  # zero gradient: no move


@pytest.mark.parametrize("which", ["W", "a"])
def test_capped_updates_keep_the_old_value(which):
    prob = make_problem(kind="mlp", depth=3)
    states = random_state(prob)
    spec = specs_of(prob)[0]
    A, b = spec.split_bias(states[0]["W"])
    if which == "W":
        An, _, _, capped, AV = dl.update_W(A, b, prob.X, states[0]["z"], 0.7, 0.1, 1e-9, 2)
        assert capped and An is A
        np.testing.assert_array_equal(AV, A @ prob.X)
    else:
        A2, b2 = spec.split_bias(states[1]["W"])
        a0 = states[0]["a"]
        an, _, _, capped = dl.update_a(a0, sigma("relu", states[0]["z"]), A2, b2,
                                       states[1]["z"], 0.7, None, 0, 0.7, 1e-9, 2)
        assert capped and an is a0


# ---------------------------------------------------------------------------------------------
# Each update against the Lagrangian
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", [1, 2, 3])
@pytest.mark.parametrize("step", ["backtracking", "lipschitz"])
def test_W_step_is_the_quadratic_approximation_step_of_L(i, step):
    prob = make_problem(kind="mlp", depth=3, loss="cross_entropy")
    states = random_state(prob, seed=i)
    spec = specs_of(prob)[i - 1]
    n, st, V = prob.n, states[i - 1], left_a(prob, states, i)
    A, b = spec.split_bias(st["W"])

    def nL(Ax):
        return n * lagrangian(prob.arch, replace(states, i, "W", np.hstack([Ax, b])), prob.X,
                              prob.Y, PEN)

    def phi(Ax):  # n L without the regulariser of A
        return nL(Ax) - 0.5 * n * PEN.lam * float(np.sum(Ax * Ax))

    if i < 3:
        T, kappa = st["z"], nu_of(PEN)
    else:
        T, kappa = st["z"] + st["u"] / PEN.rho, PEN.rho
    An, theta, trials, capped, AV = dl.update_W(A, b, V, T, kappa, n * PEN.lam, None, 30, step)
    assert not capped
    g = fd_grad(phi, A)
    np.testing.assert_allclose(An, (theta * A - g) / (theta + n * PEN.lam), rtol=1e-6,
                               atol=1e-8)
    assert sufficient_decrease(phi, A, An, g, theta, rtol=1e-9)
    np.testing.assert_allclose(AV, An @ V, rtol=1e-13)
    assert nL(An) <= nL(A)
    if step == "lipschitz":
        assert trials == 1


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("i", [1, 2, 3])
def test_a_step_is_the_quadratic_approximation_step_of_L(kind, i):
    # i = 3 is l = L-1: its right neighbour is the output layer (multiplier terms)
    prob = make_problem(kind=kind, depth=4, act="tanh")
    states = random_state(prob, seed=10 + i)
    spec = specs_of(prob)[i - 1]
    n, st, right, nu = prob.n, states[i - 1], states[i], nu_of(PEN)
    A, b = spec.split_bias(right["W"])
    c0 = sigma("tanh", st["z"]) + skip_term(prob.arch, i, left_a(prob, states, i))
    if i + 1 == prob.arch.depth:
        T, kappa, R, s2 = right["z"] + right["u"] / PEN.rho, PEN.rho, None, 0
    else:
        T, kappa = right["z"], nu
        s2 = int(kind == "resnet")
        R = right["a"] - sigma("tanh", right["z"]) if s2 else None

    def nL(a):
        return n * lagrangian(prob.arch, replace(states, i, "a", a), prob.X, prob.Y, PEN)

    a0 = st["a"]
    an, theta, _, capped = dl.update_a(a0, c0, A, b, T, kappa, R, s2, nu, None, 30)
    assert not capped
    g = fd_grad(nL, a0)
    np.testing.assert_allclose(an, a0 - g / theta, rtol=1e-6, atol=1e-8)
    assert sufficient_decrease(nL, a0, an, g, theta, rtol=1e-9)


@pytest.mark.parametrize("i", [1, 3])
def test_b_step_is_exact(i):
    prob = make_problem(kind="mlp", depth=3)
    states = random_state(prob, seed=3)
    spec = specs_of(prob)[i - 1]
    st, V, n = states[i - 1], left_a(prob, states, i), prob.n
    A, _ = spec.split_bias(st["W"])
    if i < 3:
        T, kappa = st["z"], nu_of(PEN)
    else:
        T, kappa = st["z"] + st["u"] / PEN.rho, PEN.rho
    b = dl.update_b(A, V.sum(axis=1, keepdims=True), T.sum(axis=1, keepdims=True), n, kappa,
                    PEN.lam)

    def nL(bx):
        return n * lagrangian(prob.arch, replace(states, i, "W", np.hstack([A, bx])), prob.X,
                              prob.Y, PEN)

    g0 = fd_grad(nL, st["W"][:, -1:])
    g = fd_grad(nL, b)
    assert np.abs(g).max() <= 1e-7 * np.abs(g0).max()


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_relu_z_closed_form_beats_a_brute_force_grid(act):
    rng = np.random.default_rng(5)
    c = rng.uniform(-3, 3, 60)
    m = rng.uniform(-3, 3, 60)
    nu = 0.7
    z, capped = dl.update_z(c, m, nu, np.zeros(60), get_activation(act, LEAKY), 100)
    assert capped == 0

    def phi(zz):
        return 0.5 * nu * (zz - m[:, None]) ** 2 + 0.5 * nu * (c[:, None] - sigma(act, zz)) ** 2

    grid = np.linspace(-5, 5, 200_001)[None, :]
    best = phi(grid).min(axis=1)
    assert np.all(phi(z[:, None])[:, 0] <= best + 1e-12)


def test_smooth_z_is_stationary_and_no_worse_than_its_start():
    rng = np.random.default_rng(6)
    c, m, z0 = rng.uniform(-2, 2, 40), rng.uniform(-2, 2, 40), rng.uniform(-2, 2, 40)
    nu = 0.7
    z, capped = dl.update_z(c, m, nu, z0, get_activation("tanh"), 100)
    assert capped == 0

    def phi(zz):
        return 0.5 * nu * (zz - m) ** 2 + 0.5 * nu * (c - np.tanh(zz)) ** 2

    h = 1e-6
    g = (phi(z + h) - phi(z - h)) / (2 * h)
    assert np.abs(g).max() < 1e-7
    assert np.all(phi(z) <= phi(z0) + 1e-15)


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_output_z_minimises_L(loss_name):
    prob = make_problem(kind="mlp", depth=3, loss=loss_name)
    states = random_state(prob, seed=7)
    st, n = states[2], prob.n
    Z = st["W"] @ aug(prob.arch, states[1]["a"])
    z, capped = dl.update_z_output(loss_name, prob.Y, Z, st["u"], PEN.rho, st["z"], 50)
    assert capped == 0

    def nL(zz):
        return n * lagrangian(prob.arch, replace(states, 3, "z", zz), prob.X, prob.Y, PEN)

    g0 = fd_grad(nL, st["z"], h=1e-5)
    g = fd_grad(nL, z, h=1e-5)
    assert np.abs(g).max() <= 1e-7 * np.abs(g0).max()


# ---------------------------------------------------------------------------------------------
# Tasks, objective, initial state
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "act", "loss_name"),
                         [("mlp", "relu", "cross_entropy"), ("resnet", "leaky_relu", "mse"),
                          ("mlp", "tanh", "mse"), ("resnet", "sigmoid", "cross_entropy")])
def test_every_task_descends_L_and_the_dual_step_adds_its_exact_increase(kind, act, loss_name):
    prob = make_problem(act=act, kind=kind, loss=loss_name, depth=4)
    specs = specs_of(prob)
    N = prob.arch.depth
    cur = random_state(prob, seed=2)
    prev = [dict(s) for s in cur]
    for _ in range(3):  # iterations: backward sweep, then forward sweep
        old = [dict(s) for s in cur]
        for i in range(N, 0, -1):
            L0 = lagrangian(prob.arch, cur, prob.X, prob.Y, PEN)
            right = cur[i] if i < N else None
            st, s = dl.backward_update(specs[i - 1], PEN, cur[i - 1], left_a(prob, old, i),
                                       right, Y=prob.Y if i == N else None)
            assert s["capped"] == 0
            cur[i - 1] = st
            L1 = lagrangian(prob.arch, cur, prob.X, prob.Y, PEN)
            assert L1 <= L0 + 1e-12 * abs(L0)
        bwd = [dict(s) for s in cur]
        for i in range(1, N + 1):
            L0 = lagrangian(prob.arch, cur, prob.X, prob.Y, PEN)
            right = bwd[i] if i < N else None
            st, s = dl.forward_update(specs[i - 1], PEN, bwd[i - 1], prev[i - 1],
                                      left_a(prob, cur, i), right,
                                      Y=prob.Y if i == N else None)
            cur[i - 1] = st
            L1 = lagrangian(prob.arch, cur, prob.X, prob.Y, PEN)
            # the block's objective statistic is its share of L
            share = dl.block_objective(specs[i - 1], PEN, st, left_a(prob, cur, i),
                                       prob.Y if i == N else None)
            assert s["objective"] == pytest.approx(share, rel=1e-12)
            if i < N:
                assert L1 <= L0 + 1e-12 * abs(L0)
                assert s["primal_sq"] == 0.0
            else:
                du = st["u"] - bwd[i - 1]["u"]
                increase = float(np.sum(du * du)) / (PEN.rho * prob.n)
                # the W, b, z steps descend; the multiplier step adds exactly ||du||^2/(rho n)
                assert L1 - increase <= L0 + 1e-12 * abs(L0)
                r = st["z"] - st["W"] @ aug(prob.arch, cur[N - 2]["a"])
                assert s["primal_sq"] == pytest.approx(float(np.sum(r * r)), rel=1e-12)
        prev = [dict(s) for s in cur]


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_initial_objective_is_forward_loss_plus_regulariser(kind, loss_name):
    prob = make_problem(kind=kind, loss=loss_name, depth=4)
    sp = get_algorithm("dladmm").splitting
    states = sp.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    expected = forward_objective(prob.arch, prob.weights, prob.X, prob.Y, PEN.lam)
    assert initial_objective(sp, specs_of(prob), PEN, states, prob.X, prob.Y) == \
        pytest.approx(expected, rel=1e-13)
    assert lagrangian(prob.arch, states, prob.X, prob.Y, PEN) == pytest.approx(expected,
                                                                                rel=1e-13)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_block_objectives_sum_to_L(kind):
    prob = make_problem(kind=kind, depth=4, loss="cross_entropy")
    states = random_state(prob, seed=4)
    sp = get_algorithm("dladmm").splitting
    total = initial_objective(sp, specs_of(prob), PEN, states, prob.X, prob.Y)
    assert total == pytest.approx(lagrangian(prob.arch, states, prob.X, prob.Y, PEN), rel=1e-13)


def test_nu_defaults_to_rho():
    pen = dataclasses.replace(PEN, nu=None)
    assert dl.penalty_nu(pen) == pen.rho
    prob = make_problem(kind="mlp", depth=3)
    states = random_state(prob)
    sp = get_algorithm("dladmm").splitting
    total = initial_objective(sp, specs_of(prob), pen, states, prob.X, prob.Y)
    assert total == pytest.approx(lagrangian(prob.arch, states, prob.X, prob.Y, pen), rel=1e-13)


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

def _solve(prob, iterations, rho=4.0, nu=1.0, lam=1e-3):
    cfg = AlgorithmConfig(name="dladmm", rho=rho, nu=nu, lam=lam)
    traces = []
    monitor = Monitor(iterations=iterations, eval_every=1, evaluate=lambda w: {})
    res = solve(get_algorithm("dladmm").splitting, prob.arch, prob.X, prob.Y, prob.weights,
                PenaltySchedule(schedule_options(cfg)), monitor, Options(),
                state_callback=lambda k, s: traces.append(s))
    return res, traces


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_residual_and_objective_converge(kind):
    # rho > 2H (H = 1 for the n-scaled MSE): the paper's condition for convergence
    prob = make_problem(kind=kind, depth=3, width=4, n=20, loss="mse")
    res, _ = _solve(prob, 300)
    h = res.history
    obj = np.array([r["objective"] for r in h])
    primal = np.array([r["primal_residual"] for r in h[1:]])
    dual = np.array([r["dual_residual"] for r in h[1:]])
    assert res.info["inner_solver_caps_hit"] == 0
    assert res.info["objective_increases"] == 0  # L decreases at every iteration here
    assert primal[-1] < 1e-2 * primal.max()
    assert dual[-1] < 5e-2 * dual.max()
    # monotone and bounded below (L >= 0 here), so L converges; its last steps are small
    assert abs(obj[-1] - obj[-2]) < 3e-3 * abs(obj[-1])
    assert obj[-1] < 0.1 * obj[0]


def test_two_runs_are_bitwise_equal():
    prob = make_problem(kind="resnet", act="tanh", depth=4, loss="cross_entropy")
    r1, t1 = _solve(prob, 8)
    r2, t2 = _solve(prob, 8)
    for s1, s2 in zip(t1[-1], t2[-1], strict=True):
        assert s1.keys() == s2.keys()
        for key in s1:
            np.testing.assert_array_equal(s1[key], s2[key])
    assert [r["objective"] for r in r1.history] == [r["objective"] for r in r2.history]


# ---------------------------------------------------------------------------------------------
# The published variant (algorithm=dladmm_published): the authors' rho/theta rule, their
# initialisation and their output-layer start
# ---------------------------------------------------------------------------------------------

def _rises_schedule(rise_count=3, eval_every=1, **kw) -> PenaltySchedule:
    a = dataclasses.replace(variant_config("dladmm_published").algorithm,
                            rise_count=rise_count, **kw)
    return PenaltySchedule(schedule_options(a, RunConfig(eval_every=eval_every)))


def authors_rule(costs):
    """The authors' code (MLP/pytorch_version/main.py), iteration i = 0, 1, ...: after the
    iteration, ``if i > 2 and cost[i] > cost[i-1] > cost[i-2] > cost[i-3]: rho = min(10 rho,
    0.1); tau, theta *= 10``. Returns the (rho, theta) in force at the next iteration."""
    rho, theta, out = 1e-6, 1.0, []
    for i in range(len(costs)):
        if i > 2 and costs[i] > costs[i - 1] > costs[i - 2] > costs[i - 3]:
            rho, theta = min(10 * rho, 0.1), theta * 10
        out.append((rho, theta))
    return out


COST_SEQUENCES = {
    "two_rises": [5.0, 6.0, 7.0, 6.5, 6.0],
    "three_rises": [5.0, 6.0, 7.0, 8.0, 7.0],
    "rises_broken": [5.0, 6.0, 7.0, 7.0, 8.0, 9.0, 4.0, 5.0, 6.0],
    "long_rise": [float(x) for x in range(1, 12)],  # rho reaches its cap, theta goes on
    "nan_breaks": [5.0, 6.0, 7.0, math.nan, 8.0, 9.0, 10.0, 11.0],
}


@pytest.mark.parametrize("name", COST_SEQUENCES)
def test_rises_schedule_is_the_authors_rule(name):
    costs = COST_SEQUENCES[name]
    s = _rises_schedule()
    assert s.at(1).rho == 1e-6 and s.at(1).backtrack_start == 1.0
    got = []
    for k, c in enumerate(costs, start=1):
        assert s.is_barrier(k)  # every evaluation decides the next iteration's penalties
        s.observe(k, 0.0, c)
        pen = s.at(k + 1)
        got.append((pen.rho, pen.backtrack_start))
    expected = authors_rule(costs)
    assert got == expected  # the same products in the same order
    # a change decided after iteration k (expected[k - 1]) holds from iteration k + 1
    before = [(1e-6, 1.0), *expected[:-1]]
    fired = [k + 1 for k in range(1, len(costs) + 1) if expected[k - 1] != before[k - 1]]
    assert [c[0] for c in s.changes] == fired
    if name == "two_rises":
        assert not s.changes
    if name == "three_rises":
        assert s.changes == [(5, 10 * 1e-6, 10.0)]  # after iteration 4, not before
    if name == "long_rise":
        assert s.at(12).rho == 0.1 and s.at(12).backtrack_start == 1e8


def test_rises_schedule_counts_evaluations_only():
    # eval_every = 2: only the evaluated iterations' losses count, and only they are barriers
    s = _rises_schedule(eval_every=2)
    assert [k for k in range(1, 9) if s.is_barrier(k)] == [2, 4, 6, 8]
    for k, c in zip(range(1, 9), [9.0, 1.0, 0.5, 2.0, 0.1, 3.0, 0.0, 4.0], strict=True):
        s.observe(k, 0.0, c if k % 2 == 0 else None)
    assert [c[0] for c in s.changes] == [9]  # rises at 4, 6, 8: the third fires
    # the primal residual does not move it, nor does a constant schedule see losses
    c = _rises_schedule(schedule="constant")
    for k in range(1, 6):
        c.observe(k, 1.0, float(k))
    assert not c.changes and c.at(6).rho == 1e-6 and not c.is_barrier(1)


def test_adaptive_schedule_also_raises_the_backtracking_start():
    s = _rises_schedule(schedule="adaptive", adapt_every=1, rho_max=1e-5)
    for k in range(1, 5):
        s.observe(k, 1.0)  # the primal residual never falls
    # rho capped after one raise; the start goes on, as the authors' tau and theta
    assert s.at(5).rho == pytest.approx(1e-5) and s.at(5).backtrack_start == 1e3


@pytest.mark.parametrize("split", [2, 3, 5])
def test_rises_schedule_state_round_trips_through_json(split):
    # what a checkpoint manifest stores: the count of rises and the last loss carry over
    costs = [5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, math.nan, 3.0]
    full = _rises_schedule()
    first = _rises_schedule()
    for k, c in enumerate(costs, start=1):
        full.observe(k, 0.0, c)
        if k <= split:
            first.observe(k, 0.0, c)
    second = _rises_schedule()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for k, c in enumerate(costs[split:], start=split + 1):
        second.observe(k, 0.0, c)
    assert json.dumps(second.state_dict()) == json.dumps(full.state_dict())  # NaN included
    assert second.changes == full.changes and second.at(10) == full.at(10)
    second.reset()
    assert second.at(1) == _rises_schedule().at(1) and not second.changes


def test_backtracking_starts_at_the_given_start():
    prob = make_problem(kind="mlp", depth=3)
    states = random_state(prob)
    spec = specs_of(prob)[0]
    A, b = spec.split_bias(states[0]["W"])
    V, T = prob.X, states[0]["z"]
    # whatever the last accepted theta: the first trial is the start, then doublings
    for start in (1e-3, 1e6):
        _, theta, trials, capped, _ = dl.update_W(A, b, V, T, 0.7, 0.1, 123.0, 60,
                                                  start=start)
        assert not capped and theta == start * 2.0 ** (trials - 1)
    assert dl.update_W(A, b, V, T, 0.7, 0.1, 123.0, 60, start=1e6)[2] == 1
    a0 = states[0]["a"]
    A2, b2 = spec.split_bias(states[1]["W"])
    _, theta, trials, _ = dl.update_a(a0, sigma("relu", states[0]["z"]), A2, b2,
                                      states[1]["z"], 0.7, None, 0, 0.7, 99.0, 60, start=1e-3)
    assert trials > 1 and theta == 1e-3 * 2.0 ** (trials - 1)


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_labels_output_init(loss_name):
    # the authors' start: z_L = +-1 from the one-hot labels (MSE: the targets), u = 0; the
    # hidden layers forward-consistent; L_rho then holds the output constraint's penalty
    prob = make_problem(kind="mlp", loss=loss_name, depth=3)
    sp = get_algorithm("dladmm").splitting
    states = sp.init_state(prob.arch, prob.weights, prob.X, prob.Y,
                           Options(output_init="labels"))
    out = states[-1]
    if loss_name == "cross_entropy":
        assert set(np.unique(out["z"])) == {-1.0, 1.0}
        np.testing.assert_array_equal(out["z"] == 1.0, prob.Y == 1.0)
    else:
        np.testing.assert_array_equal(out["z"], prob.Y)
    assert not np.any(out["u"])
    forward_states = sp.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    for st, fw in zip(states[:-1], forward_states[:-1], strict=True):
        for key in st:
            np.testing.assert_array_equal(st[key], fw[key])
    L = lagrangian(prob.arch, states, prob.X, prob.Y, PEN)
    r = out["z"] - prob.weights[-1] @ aug(prob.arch, states[-2]["a"])
    assert L > forward_objective(prob.arch, prob.weights, prob.X, prob.Y, PEN.lam)
    assert initial_objective(sp, specs_of(prob), PEN, states, prob.X, prob.Y) == \
        pytest.approx(L, rel=1e-13)
    assert 0.5 * PEN.rho * float(np.sum(r * r)) / prob.n > 0


def test_normal_init_has_the_given_std():
    arch = Architecture(kind="mlp", depth=3, d_in=300, width=200, d_out=10, activation="relu")
    weights = init_weights(arch, np.random.default_rng(0), normal_std=0.1)
    assert [W.shape for W in weights] == [arch.weight_shape(i) for i in (1, 2, 3)]
    flat = np.concatenate([W.ravel() for W in weights])
    # 102,010 draws: the sample std is within ~0.0002 (one standard error) of 0.1
    assert abs(flat.std() - 0.1) < 1e-3 and abs(flat.mean()) < 1e-3
    biases = np.concatenate([W[:, -1] for W in weights])
    assert abs(biases.std() - 0.1) < 0.02  # biases too, not zeros
    # the default (scaled) initialisation is another one: He for the hidden layers
    scaled = init_weights(arch, np.random.default_rng(0))
    assert abs(scaled[0][:, :-1].std() - np.sqrt(2 / 301)) < 2e-3 and not scaled[0][:, -1].any()


def _variant_cfg(iterations=6, **algorithm):
    cfg = variant_config("dladmm_published")
    for key, value in algorithm.items():
        setattr(cfg.algorithm, key, value)
    cfg.data.name, cfg.data.n_samples, cfg.data.n_classes = "synthetic", 120, 3
    cfg.model.kind, cfg.model.width, cfg.model.depth = "mlp", 6, 4
    cfg.model.activation = "relu"
    cfg.run.iterations, cfg.run.progress, cfg.run.stall_iterations = iterations, False, 0
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    return cfg


def test_variant_starts_from_the_normal_init():
    cfg = _variant_cfg(iterations=1)
    cfg.cluster.kind = "reference"
    ds = load_dataset(cfg.data, seed=cfg.run.seed)
    res = api.fit(cfg, dataset=ds)
    arch = api.build_architecture(cfg, ds)
    w0 = init_weights(arch, np.random.default_rng(cfg.run.seed), normal_std=0.1)
    assert res.history[0]["train_loss"] == api.evaluator(arch, ds)(w0)["train_loss"]
    # L_0: the forward network's hidden layers, z_L = +-1 (u = 0) at rho = 1e-6
    sp, pen = get_algorithm("dladmm").splitting, Penalties(rho=1e-6, beta=1.0, tau=1e-3, lam=0.0)
    states = sp.init_state(arch, w0, ds.X_train, ds.Y_train, Options(output_init="labels"))
    specs = [BlockSpec(arch, i, ds.n_train, Options()) for i in range(1, 5)]
    assert res.history[0]["objective"] == pytest.approx(
        initial_objective(sp, specs, pen, states, ds.X_train, ds.Y_train), rel=1e-14)


# rise_count = 1 so that the rule fires within a few iterations on this small problem (the loss
# rises once, at iteration 2): the schedule's change is part of what must agree
@pytest.mark.parametrize(("kind", "state", "chunk_size"),
                         [("synchronous", "memory", 0), ("threads", "memory", 0),
                          ("threads", "zarr", 0), ("synchronous", "zarr", 35)])
def test_variant_on_dask_equals_the_reference(kind, state, chunk_size):
    cfg = _variant_cfg(rise_count=1)
    ds = load_dataset(cfg.data, seed=0)
    cfg.cluster.kind = "reference"
    ref = api.fit(cfg, dataset=ds)
    assert ref.info["schedule_changes"] == [(3, 10 * 1e-6, 10.0)]
    cfg.cluster.kind, cfg.run.window, cfg.storage.state = kind, 3, state
    cfg.storage.chunk_size = chunk_size
    if state == "zarr":
        cfg.storage.url = f"memory://test-published-{kind}-{chunk_size}"
    res = api.fit(cfg, dataset=ds)
    assert res.info["schedule_changes"] == ref.info["schedule_changes"]
    assert res.iterations == ref.iterations == 6
    for a, b in zip(ref.weights, res.weights, strict=True):
        if chunk_size == 0:
            assert np.array_equal(a, b)  # one chunk: the same sums in the same order
        else:
            assert np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(a))
    for ra, rb in zip(ref.history, res.history, strict=True):
        assert rb["rho"] == ra["rho"]
        for col in ("objective", "primal_residual", "dual_residual", "train_loss"):
            assert rb[col] == pytest.approx(ra[col], rel=1e-14 if chunk_size == 0 else 1e-8,
                                            abs=1e-300)


def test_variant_resumes_its_schedule_exactly(tmp_path):
    # checkpoint at iteration 1, resume to 6: the rise at iteration 2 is only seen against
    # iteration 1's training loss, which must come back from the checkpoint
    cfg = _variant_cfg(rise_count=1)
    cfg.cluster.kind, cfg.storage.chunk_size, cfg.run.checkpoint_every = "threads", 40, 1
    ds = load_dataset(cfg.data, seed=0)
    full_cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
        cfg.storage, url=str(tmp_path / "full.zarr")))
    full = api.fit(full_cfg, dataset=ds)
    assert full.info["schedule_changes"] == [(3, 10 * 1e-6, 10.0)]
    part_cfg = dataclasses.replace(
        cfg, storage=dataclasses.replace(cfg.storage, url=str(tmp_path / "part.zarr")),
        run=dataclasses.replace(cfg.run, iterations=1))
    assert api.fit(part_cfg, dataset=ds).iterations == 1
    res_cfg = dataclasses.replace(part_cfg, run=dataclasses.replace(cfg.run, resume=True))
    res = api.fit(res_cfg, dataset=ds)
    assert res.info["resumed_from"] == 1 and res.iterations == 6
    assert res.info["schedule_changes"] == full.info["schedule_changes"]
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


def test_eval_every_determines_a_rises_run():
    # a resume must not change where the rises schedule looks (any other schedule: it may)
    from daskadmm.storage import changed_determinants, determinants

    cfg = _variant_cfg()
    other = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval_every=5))
    assert changed_determinants(determinants(cfg.to_dict()), determinants(other.to_dict())) \
        == ["run.eval_every (1 -> 5)"]
    for c in (cfg, other):
        c.algorithm.schedule = "constant"
    assert not changed_determinants(determinants(cfg.to_dict()), determinants(other.to_dict()))
