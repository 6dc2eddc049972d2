"""Whole-algorithm properties of RADMM-3, RADMM-3L, RADMM-2 and the serial reference.

One iteration is composed here by hand from the update functions, and the augmented Lagrangian is
evaluated after every sub-step with the independent ``helpers.lagrangian3/2`` (checked against the
library's ``block_objective`` sum as well): every primal step must not raise L plus its proximal
term, and every dual step must raise it by exactly ``||Delta Lam||^2 / (n rho)``. The composed
iteration must equal the library's block task and the reference sweep bit for bit. Then: L at
initialisation, convergence in the regimes where L is observed to be monotone, a linear network
against least squares, the penalty schedules, the monitor's stopping rules and determinism.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import (
    ACTIVATIONS,
    PEN,
    PEN_NONCONVEX,
    VARIANT_IDS,
    VARIANTS,
    Problem,
    aug,
    forward,
    forward_objective,
    lagrangian2,
    lagrangian3,
    loss,
    loss_grad_n,
    make_problem,
    random_state2,
    random_state3,
    skip_term,
    tol,
)
from threadpoolctl import threadpool_limits

from daskadmm.algorithms import get_algorithm
from daskadmm.api import schedule_options
from daskadmm.config import AlgorithmConfig
from daskadmm.engines import reference
from daskadmm.model import Architecture, init_weights
from daskadmm.monitor import IterationStats, Monitor
from daskadmm.schedules import PenaltySchedule
from daskadmm.splitting import radmm2, radmm3
from daskadmm.splitting.base import BlockSpec, Options, Penalties

TOL = tol(np.float64)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def no_metrics(weights):
    return {"train_loss": 0.0, "test_loss": 0.0, "train_metric": 0.0, "test_metric": 0.0}


def solve(name, prob, iterations, *, options=None, eval_every=1, callback=None, weights=None,
          monitor_kw=None, **cfg):
    schedule = PenaltySchedule(schedule_options(AlgorithmConfig(name=name, **cfg)))
    monitor = Monitor(iterations=iterations, eval_every=eval_every, evaluate=no_metrics,
                      **(monitor_kw or {}))
    result = reference.solve(get_algorithm(name).splitting, prob.arch, prob.X, prob.Y,
                             prob.weights if weights is None else weights, schedule, monitor,
                             options or Options(), state_callback=callback)
    return result, schedule


def copy_states(states):
    return [{k: np.array(v, copy=True) for k, v in s.items()} for s in states]


def left(prob, states, i):
    return prob.X if i == 1 else states[i - 2]["V"]


def sq(a):
    return float(np.sum(a * a))


# ---------------------------------------------------------------------------------------------
# One iteration composed by hand, with L checked after every sub-step
# ---------------------------------------------------------------------------------------------

class Ledger:
    """Evaluates L (independent formula, compared with the library's block objectives) and
    checks the per-step identities."""

    def __init__(self, prob, pen, splitting):
        self.prob, self.pen, self.splitting = prob, pen, splitting
        self.lagrangian = lagrangian3 if splitting.name != "radmm2" else lagrangian2
        self.events: list[tuple[str, float]] = []

    def __call__(self, states) -> float:
        p = self.prob
        mine = self.lagrangian(p.arch, states, p.X, p.Y, self.pen)
        lib = 0.0
        N = p.arch.depth
        for i in range(1, N + 1):
            lib += self.splitting.block_objective(BlockSpec(p.arch, i, p.n), self.pen,
                                                  states[i - 1], left(p, states, i),
                                                  p.Y if i == N else None)
        assert lib == pytest.approx(mine, rel=TOL.closed_form, abs=TOL.closed_form)
        return mine

    def slack(self, L):
        return TOL.identity * max(1.0, abs(L))

    def primal(self, name, L_before, L_after, dx):
        """L(x^{k+1}) + (tau/2n)||x^{k+1} - x^k||^2 <= L(x^k)."""
        self.events.append((name, L_after - L_before))
        prox = 0.5 * self.pen.tau * sq(dx) / self.prob.n
        assert L_after + prox <= L_before + self.slack(L_before), (name, L_after - L_before)

    def dual(self, L_before, L_after, dLam):
        """L rises by exactly ||Delta Lam||^2 / (n rho)."""
        self.events.append(("Lam", L_after - L_before))
        expected = sq(dLam) / (self.prob.n * self.pen.rho)
        assert L_after - L_before == pytest.approx(expected, abs=self.slack(L_before))


def checked_sweep3(prob, states, pen, linearized, options=None):
    """One RADMM-3 / 3L iteration from the update functions; blocks ascending, block i using
    V_{i-1} of this iteration and block i+1's state of the previous one."""
    arch, n, N = prob.arch, prob.n, prob.arch.depth
    options = options or Options()
    split = get_algorithm("radmm3l" if linearized else "radmm3").splitting
    ledger = Ledger(prob, pen, split)
    cur = [dict(s) for s in states]
    step_w = radmm3.update_weights_linearized if linearized else radmm3.update_weights
    step_v = radmm3.update_activation_linearized if linearized else radmm3.update_activation
    for i in range(1, N + 1):
        spec = BlockSpec(arch, i, n, options)
        old = dict(cur[i - 1])
        right = cur[i] if i < N else None  # not updated yet: iteration k
        Vl = left(prob, cur, i)
        Vt = aug(arch, Vl)
        hidden = i < N
        Y = None if hidden else prob.Y
        L0 = ledger(cur)
        G, B = radmm3.weight_stats(Vt, old["U"], old["Lam"], pen.rho)
        W = step_w(old["W"], G, B, pen, n)
        cur[i - 1]["W"] = W
        L1 = ledger(cur)
        ledger.primal("W", L0, L1, W - old["W"])
        Z = W @ Vt
        c = old["V"] - skip_term(arch, i, Vl) if hidden else None
        U, _ = radmm3.update_preactivation(spec, pen, old["U"], Z, old["Lam"], c, Y)
        cur[i - 1]["U"] = U
        L2 = ledger(cur)
        ledger.primal("U", L1, L2, U - old["U"])
        Lam = radmm3.update_duals(old["Lam"], U, Z, pen.rho)
        cur[i - 1]["Lam"] = Lam
        L3 = ledger(cur)
        ledger.dual(L2, L3, Lam - old["Lam"])
        if hidden:
            V = step_v(spec, pen, old["V"], Vl, U, right)
            cur[i - 1]["V"] = V
            ledger.primal("V", L3, ledger(cur), V - old["V"])
        # the library's block task is the same composition
        new, stats = radmm3.block_update(spec, pen, old, Vl, right, Y,
                                          variant="radmm3l" if linearized else "radmm3")
        assert new.keys() == cur[i - 1].keys()
        for key in new:
            assert np.array_equal(new[key], cur[i - 1][key]), (i, key)
        assert stats["primal_sq"] == pytest.approx(sq(U - Z), rel=TOL.exact, abs=0)
    return cur, ledger


def checked_sweep2(prob, states, pen, options=None):
    """One RADMM-2 iteration from the update functions, checked the same way."""
    arch, n, N = prob.arch, prob.n, prob.arch.depth
    options = options or Options()
    ledger = Ledger(prob, pen, get_algorithm("radmm2").splitting)
    cur = [dict(s) for s in states]
    for i in range(1, N + 1):
        spec = BlockSpec(arch, i, n, options)
        old = dict(cur[i - 1])
        right = cur[i] if i < N else None
        Vl = left(prob, cur, i)
        L0 = ledger(cur)
        if i < N:
            W, _, _, capped = radmm2.update_weights_hidden(spec, pen, old, Vl)
            cur[i - 1]["W"] = W
            L1 = ledger(cur)
            ledger.primal("W", L0, L1, W - old["W"])
            if i == N - 1:
                V = radmm2.update_activation_last(spec, pen, old, W, Vl, right)
            else:
                V, _, _, capped = radmm2.update_activation(spec, pen, old, W, Vl, right)
            cur[i - 1]["V"] = V
            ledger.primal("V", L1, ledger(cur), V - old["V"])
            new, _ = radmm2.block_update(spec, pen, old, Vl, right, None)
            for key in ("W", "V"):
                assert np.array_equal(new[key], cur[i - 1][key]), (i, key)
        else:
            Vt = aug(arch, Vl)
            G, B = radmm3.weight_stats(Vt, old["U"], old["Lam"], pen.rho)
            W = radmm3.update_weights(old["W"], G, B, pen, n)
            cur[i - 1]["W"] = W
            L1 = ledger(cur)
            ledger.primal("W", L0, L1, W - old["W"])
            Z = W @ Vt
            U, _ = radmm3.update_preactivation(spec, pen, old["U"], Z, old["Lam"], None, prob.Y)
            cur[i - 1]["U"] = U
            L2 = ledger(cur)
            ledger.primal("U", L1, L2, U - old["U"])
            Lam = radmm3.update_duals(old["Lam"], U, Z, pen.rho)
            cur[i - 1]["Lam"] = Lam
            ledger.dual(L2, ledger(cur), Lam - old["Lam"])
            new, _ = radmm2.block_update(spec, pen, old, Vl, None, prob.Y)
            for key in ("W", "U", "Lam"):
                assert np.array_equal(new[key], cur[i - 1][key]), (i, key)
        cur[i - 1] = new  # carries the remembered step constants of RADMM-2
    return cur, ledger


def reference_states(name, prob, start, pen, iterations, options=None):
    """The reference sweep's states after ``iterations`` iterations from ``start``."""
    split = get_algorithm(name).splitting
    options = options or Options()
    specs = [BlockSpec(prob.arch, i, prob.n, options) for i in range(1, prob.arch.depth + 1)]
    outputs = reference.initial_outputs(split, start)
    for _ in range(iterations):
        outputs, _ = reference.sweep(split, specs, pen, outputs, prob.X, prob.Y)
    return reference.block_states(split, outputs)


def assert_same_states(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert np.array_equal(sa[key], sb[key]), key


@pytest.mark.parametrize("pen", [PEN, PEN_NONCONVEX], ids=["pen", "nonconvex"])
@pytest.mark.parametrize(("kind", "bias", "loss_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("linearized", [False, True], ids=["radmm3", "radmm3l"])
def test_radmm3_substeps(linearized, act, kind, bias, loss_name, pen):
    prob = make_problem(act, kind, bias, loss=loss_name, d_out=3)
    for start in (random_state3(prob, seed=21),
                  radmm3.init_state(prob.arch, prob.weights, prob.X, prob.Y)):
        states = start
        increases = 0
        for _ in range(3):
            states, ledger = checked_sweep3(prob, states, pen, linearized)
            increases += sum(d > 0 for name, d in ledger.events if name == "Lam")
        assert increases > 0  # the dual steps did move
        name = "radmm3l" if linearized else "radmm3"
        assert_same_states(states, reference_states(name, prob, start, pen, 3))


def test_an_unknown_radmm3_variant_is_refused():
    """A misspelt variant is an error, not a silent run of plain RADMM-3."""
    prob = make_problem()
    states = radmm3.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    spec = BlockSpec(prob.arch, 1, prob.n)
    with pytest.raises(ValueError, match="unknown RADMM-3 variant 'radmm3x'"):
        radmm3.block_update(spec, PEN, states[0], prob.X, states[1], None, variant="radmm3x")


@pytest.mark.parametrize(("kind", "bias", "loss_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_radmm2_substeps(act, kind, bias, loss_name):
    prob = make_problem(act, kind, bias, loss=loss_name, d_out=3)
    for start in (random_state2(prob, seed=22),
                  radmm2.init_state(prob.arch, prob.weights, prob.X, prob.Y)):
        states = start
        for _ in range(3):
            states, _ = checked_sweep2(prob, states, PEN)
        assert_same_states(states, reference_states("radmm2", prob, start, PEN, 3))


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "bias", "loss_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("name", ["radmm3", "radmm2"])
def test_initial_objective_is_forward_loss_plus_regulariser(name, act, kind, bias, loss_name):
    prob = make_problem(act, kind, bias, loss=loss_name, d_out=3)
    split = get_algorithm(name).splitting
    states = split.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    lagr = lagrangian3 if name == "radmm3" else lagrangian2
    expected = forward_objective(prob.arch, prob.weights, prob.X, prob.Y, PEN.lam)
    assert lagr(prob.arch, states, prob.X, prob.Y, PEN) == pytest.approx(expected, rel=TOL.exact)
    specs = [BlockSpec(prob.arch, i, prob.n) for i in range(1, prob.arch.depth + 1)]
    assert reference.initial_objective(split, specs, PEN, states, prob.X, prob.Y) == \
        pytest.approx(expected, rel=TOL.exact)
    # the dual-consistent multipliers: Lam_N = -n grad l(U_N), Lam_i = 0 below
    U = forward(prob.arch, prob.weights, prob.X)[0]
    np.testing.assert_allclose(states[-1]["Lam"], -loss_grad_n(loss_name, U[-1], prob.Y),
                               rtol=TOL.exact, atol=TOL.exact)
    for st in states[:-1]:
        assert "Lam" not in st or not np.any(st["Lam"])
    # and L does not depend on the penalties there (every constraint holds)
    other = Penalties(rho=7.0, beta=3.0, tau=0.5, lam=PEN.lam)
    assert lagr(prob.arch, states, prob.X, prob.Y, other) == pytest.approx(expected, rel=TOL.exact)


# ---------------------------------------------------------------------------------------------
# Convergence, monotone and non-monotone regimes
# ---------------------------------------------------------------------------------------------

def objectives(result):
    return np.array([rec["objective"] for rec in result.history])


def count_increases(obj):
    """Rises of L by more than 1e-10 max(1, |L|): the monitor's definition of an increase
    (a relative tolerance, so rounding in a converged run does not count)."""
    return int(sum(obj[k] > obj[k - 1] + 1e-10 * max(1.0, abs(obj[k - 1]))
                   for k in range(1, len(obj))))


# (splitting, activation, rho, beta, drop): regimes where no increase of L is observed (the
# convergence theory of these methods needs rho large against the Lipschitz constants of the
# loss and sigma; in practice tanh with rho >= 2 and beta <= rho suffices, relu needs beta small
# against rho); after 300 iterations the primal residual must be below ``drop`` times its early
# maximum and the change of L below ``drop / 10`` times the first change. (relu with RADMM-3 is
# clean only for beta <= rho/5, and converges more slowly.)
MONOTONE = [
    ("radmm3", "tanh", 2.0, 1.0, 2e-3),
    ("radmm3", "tanh", 5.0, 5.0, 2e-3),
    ("radmm3", "relu", 10.0, 0.1, 3e-2),
    ("radmm3l", "tanh", 2.0, 1.0, 2e-3),
    ("radmm2", "tanh", 2.0, 1.0, 2e-3),
    ("radmm2", "relu", 2.0, 1.0, 2e-3),
]


@pytest.mark.parametrize(("name", "act", "rho", "beta", "drop"), MONOTONE)
def test_converges_monotonically(name, act, rho, beta, drop):
    prob = make_problem(act, "resnet", True, depth=3, width=5, n=30, seed=3)
    lagr = lagrangian2 if name == "radmm2" else lagrangian3
    pen = Penalties(rho=rho, beta=beta, tau=1e-3, lam=0.1)
    seen = {}

    def keep(k, states):
        if k % 50 == 0:
            seen[k] = lagr(prob.arch, states, prob.X, prob.Y, pen)

    result, _ = solve(name, prob, 300, callback=keep, rho=rho, beta=beta, tau=pen.tau,
                      lam=pen.lam)
    obj = objectives(result)
    assert result.status == "max_iter" and len(obj) == 301
    # the monitor's objective is L of the iterate
    assert len(seen) == 6
    for k, L in seen.items():
        assert obj[k] == pytest.approx(L, rel=TOL.closed_form)
    assert obj[0] == pytest.approx(forward_objective(prob.arch, prob.weights, prob.X, prob.Y,
                                                     pen.lam), rel=TOL.exact)
    # monotone in this regime, and the monitor agrees
    assert count_increases(obj) == 0
    assert result.info["objective_increases"] == 0
    assert result.info["inner_solver_caps_hit"] == 0
    # L settles and the constraints are met
    primal = np.array([rec["primal_residual"] for rec in result.history])
    assert primal[-1] <= drop * primal[1:10].max()
    assert abs(obj[-1] - obj[-2]) <= 0.1 * drop * abs(obj[1] - obj[0])
    assert obj[-1] < 0.5 * obj[0]


def test_non_monotone_regime_increases_are_counted():
    """relu, rho = 0.1, beta = 10 (rho far too small against beta for the descent argument to hold):
    L rises in about a third of the iterations; the monitor must count every rise, which this test
    recounts from the history."""
    prob = make_problem("relu", "resnet", True, depth=3, width=5, n=30, seed=3)
    result, _ = solve("radmm3", prob, 150, rho=0.1, beta=10.0, tau=1e-3, lam=1e-2)
    counted = count_increases(objectives(result))
    assert counted > 0
    assert result.info["objective_increases"] == counted


def test_linear_network_converges_to_least_squares():
    """sigma = identity, N = 2, lam = 0: the end-to-end map W_2 W_1 converges to Y X^+ and the
    forward loss to the least-squares loss (a hidden width of at least min(d_in, d_out) can
    represent any linear map, and the squared loss of a linear network has no local minimum
    that is not global, so the limit is the least-squares fit)."""
    arch = Architecture("mlp", 2, 4, 6, 2, "identity", bias=False, loss="mse")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 40))
    Y = rng.standard_normal((2, 4)) @ X + 0.3 * rng.standard_normal((2, 40))
    prob = Problem(arch, X, Y, init_weights(arch, rng))
    B_ls = Y @ np.linalg.pinv(X)
    kw = dict(eval_every=10_000, rho=1.0, beta=1.0, tau=1e-3)
    result, _ = solve("radmm3", prob, 1500, lam=0.0, **kw)
    W1, W2 = result.weights
    B = W2 @ W1
    assert np.linalg.norm(B - B_ls) <= 1e-6 * np.linalg.norm(B_ls)
    ls_loss = loss("mse", B_ls @ X, Y)
    assert loss("mse", B @ X, Y) == pytest.approx(ls_loss, rel=1e-9)
    # the start was far from it
    W1_0, W2_0 = prob.weights
    assert np.linalg.norm(W2_0 @ W1_0 - B_ls) > 0.1 * np.linalg.norm(B_ls)
    # with weight decay the product is shrunk: not least squares
    result, _ = solve("radmm3", prob, 500, lam=0.01, **kw)
    W1, W2 = result.weights
    assert np.linalg.norm(W2 @ W1 - B_ls) > 1e-3 * np.linalg.norm(B_ls)


# ---------------------------------------------------------------------------------------------
# Penalty schedules
# ---------------------------------------------------------------------------------------------

def test_grow_schedule_caps():
    cfg = AlgorithmConfig(schedule="grow", rho=1.0, beta=0.5, growth=1.5, rho_max=4.0,
                          beta_max=3.0, tau=0.01, lam=0.1)
    s = PenaltySchedule(schedule_options(cfg))
    for k in range(1, 30):
        p = s.at(k)
        assert p.rho == pytest.approx(min(1.5 ** (k - 1), 4.0), rel=TOL.rounding)
        assert p.beta == pytest.approx(min(0.5 * 1.5 ** (k - 1), 3.0), rel=TOL.rounding)
        assert p.rho <= 4.0 and p.beta <= 3.0
        assert (p.tau, p.lam) == (0.01, 0.1)
        assert not s.is_barrier(k)
    assert s.at(29).rho == 4.0 and s.at(29).beta == 3.0


def test_adaptive_schedule_changes_only_at_multiples():
    a = 4
    cfg = AlgorithmConfig(schedule="adaptive", rho=1.0, beta=1.0, adapt_every=a,
                          adapt_factor=2.0, adapt_tol=0.9, rho_max=16.0, beta_max=8.0)
    s = PenaltySchedule(schedule_options(cfg))
    rhos = []
    for k in range(1, 41):
        rhos.append(s.at(k).rho)
        s.observe(k, 1.0)  # the residual never falls
    changed = [k for k in range(2, 41) if rhos[k - 1] != rhos[k - 2]]
    assert changed and all((k - 1) % a == 0 for k in changed)
    assert changed[0] == 2 * a + 1  # first comparison at k = 2a
    assert max(rhos) == 16.0 and s.at(40).beta == 8.0
    assert [c[0] for c in s.changes] == changed
    assert all(s.is_barrier(k) == (k % a == 0) for k in range(1, 41))
    # a residual that keeps falling fast enough never triggers a change
    s2 = PenaltySchedule(schedule_options(cfg))
    for k in range(1, 41):
        s2.observe(k, 0.5**k)
        assert s2.at(k + 1).rho == 1.0
    assert s2.changes == []


def test_schedule_state_dict_round_trips_through_json():
    """A schedule restored from its JSON'd state_dict (a checkpoint) continues exactly as the
    original would; reset() is iteration 0."""
    import json

    cfg = AlgorithmConfig(schedule="adaptive", rho=1.0, beta=1.0, adapt_every=3,
                          adapt_factor=2.0, adapt_tol=0.9, rho_max=64.0, beta_max=64.0)
    s = PenaltySchedule(schedule_options(cfg))
    for k in range(1, 14):
        s.observe(k, 1.0)
    assert s.changes
    t = PenaltySchedule(schedule_options(cfg))
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.state_dict() == s.state_dict() and t.changes == s.changes
    for k in range(14, 30):
        assert t.at(k) == s.at(k)
        s.observe(k, 1.0)
        t.observe(k, 1.0)
    assert t.changes == s.changes
    t.reset()
    fresh = PenaltySchedule(schedule_options(cfg))
    assert t.state_dict() == fresh.state_dict() and t.at(1) == fresh.at(1)


def test_monitor_state_dict_round_trips_through_json():
    import json

    m = Monitor(iterations=10, eval_every=1, evaluate=no_metrics)
    w = [np.ones((2, 2))]
    m.start(5.0, w, 1.0, 1.0)
    for k, obj in ((1, 4.0), (2, 4.5), (3, float("nan"))):
        it = IterationStats(obj, 0.1, 0.1, 1)
        m.step(k, it, 1.0, 1.0)
        m.record(k, it, w, 1.0, 1.0)
    state = m.state_dict()
    assert set(state) == {"history", "increases", "capped_total", "last_objective",
                          "last_params"}
    # as a manifest stores it: NaN becomes null
    text = json.dumps(state).replace("NaN", "null")
    n = Monitor(iterations=10, eval_every=1, evaluate=no_metrics)
    n.load_state_dict(json.loads(text))
    assert n.objective0 == 5.0 and n.capped_total == m.capped_total == 3
    assert n.increases == m.increases == [(2, 0.5)]
    assert n._last_params == (1.0, 1.0) and math.isnan(n._last_objective)
    assert len(n.history) == 4 and math.isnan(n.history[-1]["objective"])
    # a manifest from before last_objective / last_params were stored: from the last record
    old = json.loads(text)
    del old["last_objective"], old["last_params"]
    n.load_state_dict(old)
    assert n._last_params == (1.0, 1.0) and math.isnan(n._last_objective)


def test_adaptive_schedule_in_the_reference_solver():
    a = 5
    prob = make_problem("tanh", "resnet", True, depth=3, width=5, n=30, seed=3)
    result, schedule = solve("radmm3", prob, 40, schedule="adaptive", adapt_every=a,
                             adapt_tol=1e-12, adapt_factor=1.5, rho=2.0, beta=1.0, rho_max=10.0,
                             beta_max=10.0, tau=1e-3, lam=1e-2)
    # record k holds iteration k's (rho, beta)
    params = [(rec["rho"], rec["beta"]) for rec in result.history]
    changed = [k for k in range(2, len(params)) if params[k] != params[k - 1]]
    assert changed and all((k - 1) % a == 0 for k in changed)
    assert [c[0] for c in schedule.changes] == changed
    assert [c[1:] for c in schedule.changes] == [params[k] for k in changed]
    assert max(params) == (10.0, 10.0)  # both capped
    assert result.info["schedule_changes"] == schedule.changes


def test_grow_schedule_monotone_at_equal_parameters():
    """With a growing schedule, L at the *new* parameters does not rise across primal steps
    (always) nor across whole iterations in the monotone regime (tanh, rho >= 2, beta <= rho);
    raising the penalties changes L itself, so L is compared at equal parameters."""
    prob = make_problem("tanh", "resnet", True, depth=3, width=5, n=30, seed=4)
    cfg = dict(schedule="grow", rho=2.0, beta=1.0, growth=1.05, rho_max=6.0, beta_max=3.0,
               tau=1e-3, lam=1e-2)
    schedule = PenaltySchedule(schedule_options(AlgorithmConfig(**cfg)))
    states = radmm3.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    raised_by_schedule = 0
    for k in range(1, 41):
        pen = schedule.at(k)
        new, ledger = checked_sweep3(prob, states, pen, linearized=False)  # primal steps
        L_old = lagrangian3(prob.arch, states, prob.X, prob.Y, pen)
        L_new = lagrangian3(prob.arch, new, prob.X, prob.Y, pen)
        assert L_new <= L_old + TOL.identity * abs(L_old), k
        if k > 1:
            prev = schedule.at(k - 1)
            raised_by_schedule += L_old > lagrangian3(prob.arch, states, prob.X, prob.Y, prev)
        states = new
    assert raised_by_schedule > 0  # the comparison at equal parameters is what matters
    # the hand-composed iterations are the reference solver's
    seen = {}
    solve("radmm3", prob, 40, callback=lambda k, st: seen.update({k: st}), **cfg)
    assert_same_states(states, seen[40])


# ---------------------------------------------------------------------------------------------
# Monitor: stopping rules and the increase log
# ---------------------------------------------------------------------------------------------

def make_monitor(**kw):
    m = Monitor(iterations=10, eval_every=1, evaluate=no_metrics, **kw)
    m.start(2.0, [], 1.0, 1.0)
    return m


def rec(k, objective=1.0, primal=1.0, dual=1.0, **extra):
    return {"iteration": k, "objective": objective, "primal_residual": primal,
            "dual_residual": dual, **extra}


def test_monitor_stopping_rules():
    m = make_monitor(tol_primal=1e-3, tol_dual=1e-2)
    assert m.check(rec(1)) is None
    assert m.check(rec(1, primal=1e-4)) is None  # dual not met yet
    assert m.check(rec(1, primal=1e-3, dual=1e-2)) == "converged"
    assert m.check(rec(0, primal=0.0, dual=0.0)) is None  # never at the start
    m1 = make_monitor(tol_primal=1e-3)  # tol_dual = 0: not checked
    assert m1.check(rec(3, primal=1e-4, dual=5.0)) == "converged"
    m0 = make_monitor()  # no tolerances: never converged
    assert m0.check(rec(3, primal=0.0, dual=0.0)) is None
    assert m.check(rec(2, objective=math.nan)) == "nonfinite"
    assert m.check(rec(2, objective=math.inf)) == "nonfinite"
    assert m.check(rec(2, test_loss=math.nan)) == "nonfinite"
    m2 = make_monitor(diverge_factor=1e3)
    assert m2.check(rec(2, objective=1.9e3)) is None
    assert m2.check(rec(2, objective=2.1e3)) == "diverged"  # 1e3 x max(1, |L0| = 2)


def test_monitor_logs_increases_at_equal_parameters_only():
    m = make_monitor()
    for k, (obj, rho) in enumerate([(1.5, 1.0), (1.6, 1.0), (1.7, 2.0), (1.65, 2.0),
                                    (1.65 + 1e-12, 2.0), (1.8, 2.0)], start=1):
        m.step(k, IterationStats(obj, 0.0, 0.0, 0), rho, 1.0)
    assert [k for k, _ in m.increases] == [2, 6]
    assert m.increases[1][1] == pytest.approx(1.8 - 1.65 - 1e-12)


def test_solver_stops_with_status():
    prob = make_problem("tanh", "resnet", True, depth=3, width=5, n=30, seed=3)
    kw = dict(rho=2.0, beta=1.0, tau=1e-3, lam=1e-2)
    res, _ = solve("radmm3", prob, 400, eval_every=5, monitor_kw={"tol_primal": 1e-3}, **kw)
    assert res.status == "converged" and res.iterations < 400
    assert res.iterations % 5 == 0 and res.history[-1]["primal_residual"] <= 1e-3
    assert res.history[-2]["primal_residual"] > 1e-3
    res, _ = solve("radmm3", prob, 50, monitor_kw={"diverge_factor": 1e-6}, **kw)
    assert (res.status, res.iterations) == ("diverged", 1)

    calls = []

    def nan_from_iteration_4(weights):  # called at iteration 0, 1, 2, ...
        calls.append(1)
        return dict(no_metrics(weights), train_loss=math.nan if len(calls) > 4 else 0.0)

    schedule = PenaltySchedule(schedule_options(AlgorithmConfig(**kw)))
    monitor = Monitor(iterations=50, eval_every=1, evaluate=nan_from_iteration_4)
    res = reference.solve(get_algorithm("radmm3").splitting, prob.arch, prob.X, prob.Y,
                          prob.weights, schedule, monitor)
    assert (res.status, res.iterations) == ("nonfinite", 4)
    # a genuinely non-finite state (inf targets) is caught too
    Y = prob.Y.copy()
    Y[0, 0] = np.inf
    bad = Problem(prob.arch, prob.X, Y, prob.weights)
    with np.errstate(all="ignore"):
        res, _ = solve("radmm3", bad, 20, **kw)
    assert res.status == "nonfinite"


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "act"), [("radmm3", "tanh"), ("radmm3", "relu"),
                                           ("radmm3a", "relu"), ("radmm3a", "tanh"),
                                           ("radmm3l", "sigmoid"), ("radmm2", "relu")])
def test_reference_runs_are_bitwise_identical(name, act):
    prob = make_problem(act, "resnet", True, loss="cross_entropy", d_out=3, seed=5)
    runs = []
    for _ in range(2):
        seen = []
        res, _ = solve(name, prob, 25, callback=lambda k, st, seen=seen: seen.append(st),
                       rho=1.0, beta=2.0, tau=1e-2, lam=1e-3)
        runs.append((res, seen))
    (r1, s1), (r2, s2) = runs
    for W1, W2 in zip(r1.weights, r2.weights, strict=True):
        assert np.array_equal(W1, W2)
    for a, b in zip(s1, s2, strict=True):
        assert_same_states(a, b)
    drop = {"wall_time"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in r1.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in r2.history]


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3l", "radmm2"])
def test_exploding_forward_pass_ends_nonfinite_not_with_an_exception(algorithm):
    """A deep relu resnet without down-scaled residual blocks overflows; the run must stop
    with status nonfinite (SPD solves that fail numerically give NaN, not LinAlgError)."""
    from daskadmm import api
    from daskadmm.config import Config

    cfg = Config()
    cfg.algorithm.name = algorithm
    cfg.data.name = "synthetic"
    cfg.data.n_samples = 60
    cfg.model.activation = "relu"
    cfg.model.depth = 64
    cfg.model.width = 8
    cfg.model.residual_scale = 30.0
    cfg.cluster.kind = "reference"
    cfg.run.iterations = 3
    res = api.fit(cfg)  # must not raise
    if algorithm == "radmm3":  # its exact solves break down on the overflowing state
        assert res.status == "nonfinite", res.status
        assert "NaN or inf" in res.message
    else:  # the linearized steps may limp on for a few iterations; the status is still valid
        assert res.status in ("nonfinite", "diverged", "max_iter"), res.status
