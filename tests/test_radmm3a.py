"""RADMM-3A (activation multipliers, backward-pass start) and the depth-scaled initialisation.

The mechanisms, not accuracy numbers: the start is the true network's backward pass (multipliers
equal -n times the loss gradients, by finite differences), L at the start is the forward loss, the
primal steps are stationary for the augmented Lagrangian with the activation multipliers, the
multiplier step is the stated one, block 1's weights move in the first iteration (and move
downhill for the true loss) where RADMM-3's do not, and depth scaling keeps the forward signal
from growing with depth.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import zarr
from helpers import (
    PEN,
    VARIANT_IDS,
    VARIANTS,
    aug,
    fd_grad,
    forward,
    forward_objective,
    lagrangian3,
    left_value,
    loss,
    make_problem,
    random_state3,
    sigma,
    skip,
    skip_term,
    tol,
)
from support import chunked_window, replace_sections
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.algorithms import get_algorithm
from daskadmm.config import from_mapping
from daskadmm.data import load_dataset
from daskadmm.engines import reference
from daskadmm.errors import StoreError
from daskadmm.graph import critical_path_length
from daskadmm.model import Architecture, init_weights
from daskadmm.splitting import radmm3, radmm3a
from daskadmm.splitting.base import BlockSpec, Options, Penalties
from daskadmm.storage import MANIFEST

TOL = tol(np.float64)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def lagrangian3a(arch, states, X, Y, pen) -> float:
    """RADMM-3's L plus sum_{i<N} <Gam_i, V_i - s_i V_{i-1} - sigma(U_i)>/n, term by term."""
    n, N = X.shape[1], arch.depth
    total = lagrangian3(arch, states, X, Y, pen)
    V = [X] + [states[i]["V"] for i in range(N - 1)]
    for i in range(1, N):
        p = V[i] - skip_term(arch, i, V[i - 1]) - sigma(arch.activation, states[i - 1]["U"])
        total += float(np.sum(states[i - 1]["Gam"] * p)) / n
    return total


def loss_from(arch, weights, Y, i, value):
    """The forward loss as a function of V_i."""
    V = value
    for j in range(i + 1, arch.depth + 1):
        Z = weights[j - 1] @ aug(arch, V)
        if j == arch.depth:
            return loss(arch.loss, Z, Y)
        V = skip_term(arch, j, V) + sigma(arch.activation, Z)
    raise AssertionError


def random_gam(prob, states, seed=5):
    rng = np.random.default_rng(seed)
    for st in states[:-1]:
        st["Gam"] = 0.5 * rng.standard_normal(st["V"].shape)
    return states


@pytest.mark.parametrize(("kind", "bias", "loss_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_start_is_the_backward_pass(act, kind, bias, loss_name):
    prob = make_problem(act, kind, bias, loss_name, depth=4, n=12)
    arch, X, Y = prob.arch, prob.X, prob.Y
    states = radmm3a.init_state(arch, prob.weights, X, Y)
    # every constraint holds: L at the start is the forward loss plus the regulariser
    L0 = lagrangian3a(arch, states, X, Y, PEN)
    F0 = forward_objective(arch, prob.weights, X, Y, PEN.lam)
    assert abs(L0 - F0) <= TOL.exact * max(1.0, abs(F0))
    # Gam_i = -n dl/dV_i and Lam_i = -n dl/dU_i = Gam_i * sigma'(U_i)
    n = prob.n
    U, V = forward(arch, prob.weights, X)
    for i in range(1, arch.depth):
        # relu: samples that meet a kink downstream (e.g. a whole layer at 0 without a bias)
        # have no derivative, and finite differences see one side of it
        smooth = np.all([np.all(np.abs(U[j - 1]) > 1e-4, axis=0) for j in range(i, arch.depth)],
                        axis=0)
        g = fd_grad(lambda v, i=i: loss_from(arch, prob.weights, Y, i, v), V[i], h=1e-6)
        scale = max(1.0, float(np.abs(g).max()) * n)
        assert np.abs((states[i - 1]["Gam"] + n * g)[:, smooth]).max() <= 1e-6 * scale
        h = 1e-6

        def of_u(u, i=i):
            return loss_from(arch, prob.weights, Y, i, skip_term(arch, i, V[i - 1]) + sigma(act, u))

        gu = fd_grad(of_u, U[i - 1], h=h)
        assert np.abs((states[i - 1]["Lam"] + n * gu)[:, smooth]).max() <= 1e-6 * scale


@pytest.mark.parametrize(("kind", "bias", "loss_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("i", [1, 2, 3])
def test_block_update_steps(act, kind, bias, loss_name, i):
    """U (smooth sigma) and V are stationary for n L_A plus the proximal term, and the
    multiplier step is Gam += GAMMA_STEP beta (V - s V_{i-1} - sigma(U))."""
    prob = make_problem(act, kind, bias, loss_name, depth=4, n=10)
    arch, X, Y = prob.arch, prob.X, prob.Y
    states = random_gam(prob, random_state3(prob))
    spec = BlockSpec(arch, i, prob.n, Options())
    own, right = states[i - 1], states[i]
    Vleft = left_value(prob, states, i)
    new, _ = radmm3a.block_update(spec, PEN, own, Vleft, right, None)
    n = prob.n

    # V: quadratic subproblem, so the FD gradient at the update is rounding only
    def f_v(v):
        st = [dict(s) for s in states]
        st[i - 1] = {"W": new["W"], "U": new["U"], "Lam": new["Lam"], "V": v, "Gam": own["Gam"]}
        return n * lagrangian3a(arch, st, X, Y, PEN) + 0.5 * PEN.tau * float(
            np.sum((v - own["V"]) ** 2))

    g_new = fd_grad(f_v, new["V"])
    g_old = fd_grad(f_v, own["V"])
    assert np.abs(g_new).max() <= TOL.fd_grad * 10 * np.abs(g_old).max()

    # U (tanh: smooth, so a stationary point has a zero FD gradient)
    if act == "tanh":
        def f_u(u):
            st = [dict(s) for s in states]
            st[i - 1] = {"W": new["W"], "U": u, "Lam": own["Lam"], "V": own["V"],
                         "Gam": own["Gam"]}
            return n * lagrangian3a(arch, st, X, Y, PEN) + 0.5 * PEN.tau * float(
                np.sum((u - own["U"]) ** 2))

        gu_new = fd_grad(f_u, new["U"], h=1e-6)
        gu_old = fd_grad(f_u, own["U"], h=1e-6)
        assert np.abs(gu_new).max() <= 1e-5 * np.abs(gu_old).max()

    # the multiplier step
    p = new["V"] - skip_term(arch, i, Vleft) - sigma(act, new["U"])
    expected = own["Gam"] + radmm3a.GAMMA_STEP * PEN.beta * p
    assert np.abs(new["Gam"] - expected).max() <= TOL.closed_form * max(
        1.0, float(np.abs(expected).max()))


def _one_iteration(name, prob, pen):
    split = get_algorithm(name).splitting
    specs = [BlockSpec(prob.arch, i, prob.n, Options()) for i in range(1, prob.arch.depth + 1)]
    states = split.init_state(prob.arch, prob.weights, prob.X, prob.Y)
    outs, _ = reference.sweep(split, specs, pen, reference.initial_outputs(split, states),
                              prob.X, prob.Y)
    return reference.block_states(split, outs)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_first_iteration_moves_block_1_downhill(act):
    """From the forward-pass start RADMM-3's first block cannot move in iteration 1 (lam = 0:
    its W step is a fixed point), because the loss reaches it only after N iterations. From the
    backward-pass start RADMM-3A's does, in a descent direction of the true loss."""
    prob = make_problem(act, "resnet", True, "mse", depth=6, width=6, n=30)
    pen = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=0.0)
    W1 = prob.weights[0]
    plain = _one_iteration("radmm3", prob, pen)[0]["W"]
    assert np.abs(plain - W1).max() <= 1e-12 * np.abs(W1).max()
    moved = _one_iteration("radmm3a", prob, pen)[0]["W"]
    step = moved - W1
    assert np.abs(step).max() >= 1e-3 * np.abs(W1).max()

    def loss_w1(w):
        return forward_objective(prob.arch, [w] + prob.weights[1:], prob.X, prob.Y, 0.0)

    grad = fd_grad(loss_w1, W1, h=1e-6)
    assert float(np.sum(grad * step)) < 0.0


def _same_weights(full, res) -> None:
    """A resumed run ``res`` ends on the uninterrupted run ``full``'s weights, bit for bit."""
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)


def _zarr_cfg(**run):
    return from_mapping({"algorithm": {"name": "radmm3a"}, "cluster": {"kind": "threads"},
                         "data": {"name": "synthetic", "n_samples": 100, "n_classes": 3},
                         "model": {"width": 5, "depth": 5, "activation": "relu"},
                         "storage": {"chunk_size": 30},
                         "run": {"iterations": 12, "eval_every": 3, "checkpoint_every": 3,
                                 "progress": False, **run}})


def test_zarr_checkpoint_holds_gam_and_resumes_bitwise(tmp_path):
    """On the Zarr-resident engine Gam_i (i < N) is stored per chunk in the parity slots like
    V, checkpointed with a checksum per chunk, and restored: a run stopped after 8 iterations
    (its live slots hold iteration 8 and 7) resumes from checkpoint 6 to 12 and equals a
    12-iteration run bit for bit. A damaged Gam chunk of the checkpoint is refused on resume
    (the checksum list comes from the store layout)."""
    cfg = _zarr_cfg()
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(replace_sections(cfg, storage={"url": str(tmp_path / "full.zarr")}),
                   dataset=ds)
    assert full.info["engine"] == "dask-zarr" and full.info["chunks"] == 3
    url = tmp_path / "part.zarr"
    part = api.fit(replace_sections(cfg, storage={"url": str(url)}, run={"iterations": 8}),
                   dataset=ds)
    assert part.iterations == 8
    g = zarr.open_group(str(url), mode="r")
    manifest = json.loads((url / MANIFEST).read_text())
    N, n = 5, ds.n_train
    for i in range(1, N):
        assert g[f"live/b{i}/Gam"].shape == (2, 5, n) and g[f"live/b{i}/Gam"].chunks == (1, 5, 30)
        assert len(manifest["checksums"][f"b{i}/Gam"]) == 3
        assert np.abs(np.asarray(g[f"ckpt/{manifest['slot']}/b{i}/Gam"][...])).max() > 0
    assert f"live/b{N}/Gam" not in g and f"b{N}/Gam" not in manifest["checksums"]

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(url, damaged)
    victim = damaged / "ckpt" / manifest["slot"] / "b2" / "Gam" / "c" / "0" / "1"
    data = victim.read_bytes()
    victim.write_bytes(data[:40] + bytes([data[40] ^ 0x01]) + data[41:])
    with pytest.raises(StoreError, match="b2/Gam/c/0/1 is damaged"):
        api.fit(replace_sections(cfg, storage={"url": str(damaged)}, run={"resume": True}),
                dataset=ds)

    res = api.fit(replace_sections(cfg, storage={"url": str(url)}, run={"resume": True}),
                  dataset=ds)
    assert res.info["resumed_from"] == 6 and res.iterations == 12
    _same_weights(full, res)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


@pytest.mark.parametrize(("N", "K"), [(3, 2), (5, 4), (8, 3)])
def test_zarr_graph_is_radmm3s_wiring(N, K):
    """RADMM-3A's per-(block, chunk) graph is RADMM-3's: the same tasks and dependencies, so the
    chain of chunk tasks is 2K + N - 2 for K iterations (the start, forward and backward pass,
    is one task per chunk before it)."""
    graphs = {name: chunked_window(N, K, 30, 7, name)[0] for name in ("radmm3", "radmm3a")}
    a, b = graphs["radmm3"].nodes, graphs["radmm3a"].nodes

    def wiring(nodes, name):
        return [(x.key.replace(name, "X"), [d.replace(name, "X") for d in x.deps()])
                for x in nodes]

    assert wiring(a, "radmm3_") == wiring(b, "radmm3a_")
    assert critical_path_length(b, "radmm3a_chunk-") == 2 * K + N - 2
    # RADMM-3A's checkpoint copies Gam of the hidden blocks too
    ck = {x.key: x.args[2] for x in b if x.key.startswith("checkpoint-")}
    assert ck["checkpoint-b1-c0-k2-r"] == ("U", "Lam", "V", "Gam")
    assert ck[f"checkpoint-b{N}-c0-k2-r"] == ("U", "Lam")


@pytest.mark.parametrize("depth", [3, 8, 64])
def test_depth_scaling_divides_residual_blocks_by_sqrt_count(depth):
    arch = Architecture("resnet", depth, 5, 16, 3, "relu")
    plain = init_weights(arch, np.random.default_rng(1), 0.3)
    scaled = init_weights(arch, np.random.default_rng(1), 0.3, depth_scaling=True)
    R = depth - 2
    for i, (a, b) in enumerate(zip(plain, scaled, strict=True), start=1):
        factor = 1.0 / math.sqrt(R) if skip(arch, i) and R > 1 else 1.0
        np.testing.assert_allclose(b, a * factor, rtol=1e-15, atol=0)


def test_depth_scaling_bounds_forward_growth():
    """RMS of the last block output over the first: slow growth with depth scaling (only the
    drift of the positive relu means), geometric without (relu, He, residual_scale 0.3)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 200))

    def growth(depth, scaled):
        arch = Architecture("resnet", depth, 8, 64, 2, "relu")
        W = init_weights(arch, np.random.default_rng(1), 0.3, depth_scaling=scaled)
        V = forward(arch, W, X)[1]
        return float(np.sqrt(np.mean(V[-1] ** 2) / np.mean(V[1] ** 2)))

    assert growth(64, True) < 4.0
    assert growth(64, True) < 3.0 * growth(8, True)
    assert growth(64, False) > 100.0 * growth(64, True)


def _plain_update(spec, pen, own, Vleft, right, Y):
    """RADMM-3A's block update without over-relaxation, written out with its pieces."""
    Vt = spec.aug(Vleft)
    G, B = radmm3.weight_stats(Vt, own["U"], own["Lam"], pen.rho)
    W = radmm3.update_weights(own["W"], G, B, pen, spec.n)
    Z = W @ Vt
    c = None if spec.is_output else radmm3a.prox_target(spec, pen, own["V"], Vleft, own["Gam"])
    U, _ = radmm3.update_preactivation(spec, pen, own["U"], Z, own["Lam"], c, Y)
    out = {"W": W, "U": U, "Lam": radmm3.update_duals(own["Lam"], U, Z, pen.rho)}
    if not spec.is_output:
        out["V"] = radmm3a.update_activation(spec, pen, own["V"], Vleft, U, own["Gam"], right)
        out["Gam"] = radmm3a.update_multiplier(
            pen, own["Gam"], radmm3a.activation_residual(spec, out["V"], Vleft, U))
    return out


def _relax_case(i, relax):
    prob = make_problem("relu", "resnet", True, "mse", depth=4, n=10)
    states = random_gam(prob, random_state3(prob))
    spec = BlockSpec(prob.arch, i, prob.n, Options(relax=relax))
    right = None if i == prob.arch.depth else states[i]
    Y = prob.Y if i == prob.arch.depth else None
    return prob, spec, states[i - 1], left_value(prob, states, i), right, Y


@pytest.mark.parametrize("i", [1, 2, 4])
def test_over_relaxation_one_is_the_plain_update(i):
    """relax = 1 gives the plain update bit for bit."""
    _, spec, own, Vleft, right, Y = _relax_case(i, 1.0)
    new, _ = radmm3a.block_update(spec, PEN, own, Vleft, right, Y)
    expected = _plain_update(spec, PEN, own, Vleft, right, Y)
    assert new.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(new[key], expected[key]), key


def test_over_relaxed_output_block():
    """Output block (MSE): W is the plain step; U and Lam use ``Z_a = a Z + (1 - a) U^k``:
    ``U = (Y + rho Z_a - Lam + tau U^k) / (1 + rho + tau)``, ``Lam+ = Lam + rho (U - Z_a)``."""
    prob, spec, own, Vleft, right, Y = _relax_case(4, 1.6)
    new, _ = radmm3a.block_update(spec, PEN, own, Vleft, right, Y)
    plain = _plain_update(spec, PEN, own, Vleft, right, Y)
    assert np.array_equal(new["W"], plain["W"])
    Za = 1.6 * (new["W"] @ spec.aug(Vleft)) - 0.6 * own["U"]
    U = (Y + PEN.rho * Za - own["Lam"] + PEN.tau * own["U"]) / (1 + PEN.rho + PEN.tau)
    assert np.abs(new["U"] - U).max() <= 1e-12 * np.abs(U).max()
    assert np.abs(new["Lam"] - (own["Lam"] + PEN.rho * (U - Za))).max() <= 1e-12 * np.abs(
        own["Lam"]).max()
    assert np.abs(new["U"] - plain["U"]).max() >= 1e-3 * np.abs(U).max()


@pytest.mark.parametrize("i", [1, 2])
def test_over_relaxed_activation_constraint(i):
    """Hidden block: the V step and the multiplier step see ``sigma_a = a sigma(U) + (1 - a)
    (V^k - s V_{i-1})`` for ``sigma(U)`` (U itself from the over-relaxed U step): ``Gam+ = Gam
    + GAMMA_STEP beta (V - s V_{i-1} - sigma_a)``, and V is stationary for n L_A + the proximal
    term with sigma_a in the own activation term."""
    prob, spec, own, Vleft, right, Y = _relax_case(i, 1.7)
    new, _ = radmm3a.block_update(spec, PEN, own, Vleft, right, Y)
    sv = skip_term(prob.arch, i, Vleft)
    sig_a = 1.7 * sigma("relu", new["U"]) - 0.7 * (own["V"] - sv)
    expected = own["Gam"] + radmm3a.GAMMA_STEP * PEN.beta * (new["V"] - sv - sig_a)
    assert np.abs(new["Gam"] - expected).max() <= 1e-12 * np.abs(expected).max()
    # V: the same linear system as the plain step with sigma(U) replaced by sigma_a, so its
    # residual is rounding; the plain V differs
    rhs_a = radmm3a.update_activation(spec, PEN, own["V"], Vleft, new["U"], own["Gam"], right,
                                      sigma_own=sig_a)
    assert np.array_equal(new["V"], rhs_a)
    plain_v = radmm3a.update_activation(spec, PEN, own["V"], Vleft, new["U"], own["Gam"], right)
    assert np.abs(new["V"] - plain_v).max() >= 1e-3 * np.abs(plain_v).max()


def _small_reference_cfg(iterations: int, eval_every: int, **algorithm):
    """RADMM-3A (``algorithm`` keys set) on the serial reference: 100 synthetic samples, a relu
    resnet of width 6 and depth 4; the problem the chunked engine is compared on."""
    return from_mapping({"algorithm": {"name": "radmm3a", **algorithm},
                         "cluster": {"kind": "reference"},
                         "data": {"name": "synthetic", "n_samples": 100},
                         "model": {"width": 6, "depth": 4, "activation": "relu"},
                         "run": {"iterations": iterations, "eval_every": eval_every,
                                 "progress": False}})


def _chunked_runs_match(cfg, ds, ref, tag: str) -> list:
    """``cfg`` on the Zarr engine with 1 and 3 chunks (of 100 samples): each run's weights
    agree with the reference run ``ref`` to 1e-8 relative. Returns the runs."""
    runs = []
    for chunk_size in (0, 30):
        res = api.fit(replace_sections(cfg, cluster={"kind": "synchronous"},
                                       storage={"chunk_size": chunk_size,
                                                "url": f"memory://{tag}-{chunk_size}-{id(cfg)}"}),
                      dataset=ds)
        assert res.info["engine"] == "dask-zarr"
        for a, b in zip(ref.weights, res.weights, strict=True):
            assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()
        runs.append(res)
    return runs


def test_over_relaxed_chunks_match_the_reference():
    """The Zarr engine's chunk tasks apply both relaxations like the reference (1 and 3
    chunks of a 20-iteration run agree to rounding); the default (1.8) is not the plain run."""
    cfg = _small_reference_cfg(20, 5)
    ds = load_dataset(cfg.data, seed=0)
    assert cfg.algorithm.relax == 1.8  # radmm3a's default
    ref = api.fit(cfg, dataset=ds)
    plain = api.fit(replace_sections(cfg, algorithm={"relax": 1.0}), dataset=ds)
    assert max(np.abs(a - b).max() for a, b in zip(ref.weights, plain.weights, strict=True)) > 1e-3
    _chunked_runs_match(cfg, ds, ref, "relax")


@pytest.mark.parametrize("variant", ["radmm3", "radmm3l", "radmm3a"])
@pytest.mark.parametrize("i", [1, 2, 3, 4])
def test_hidden_blocks_weight_decay_is_scaled(variant, i):
    """``input_lam_scale`` / ``hidden_lam_scale``: the W step of the input block (of a hidden
    block, 2..N-1) and its share of the objective use ``lam`` times that scale; the output
    block keeps ``lam``; scales of 1 are the plain update bit for bit."""
    from daskadmm.splitting.base import block_lam, block_penalties

    prob = make_problem("relu", "resnet", True, "mse", depth=4, n=10)
    states = random_gam(prob, random_state3(prob))
    right = None if i == prob.arch.depth else states[i]
    Y = prob.Y if i == prob.arch.depth else None
    own, Vleft = states[i - 1], left_value(prob, states, i)
    if variant != "radmm3a":
        own = {k: v for k, v in own.items() if k != "Gam"}
        right = None if right is None else {k: v for k, v in right.items() if k != "Gam"}
    plain = BlockSpec(prob.arch, i, prob.n, Options())
    scaled = BlockSpec(prob.arch, i, prob.n, Options(input_lam_scale=3.0, hidden_lam_scale=0.1))
    hidden = 1 < i < prob.arch.depth
    scale = 3.0 if i == 1 else 0.1 if hidden else 1.0
    assert block_lam(scaled, PEN.lam) == scale * PEN.lam
    assert block_penalties(plain, PEN) is PEN
    assert (block_penalties(scaled, PEN) is PEN) == (i == prob.arch.depth)
    new, stats = radmm3.block_update(scaled, PEN, own, Vleft, right, Y, variant=variant)
    # the same update with the block's lam given outright (scale 1)
    lam_i = PEN.lam * scale if scale != 1.0 else PEN.lam
    pen_i = Penalties(PEN.rho, PEN.beta, PEN.tau, lam_i)
    ref, ref_stats = radmm3.block_update(plain, pen_i, own, Vleft, right, Y, variant=variant)
    for key in ref:
        assert np.array_equal(new[key], ref[key]), key
    assert stats == ref_stats
    if scale != 1.0:  # and it is not the update with lam
        other, _ = radmm3.block_update(plain, PEN, own, Vleft, right, Y, variant=variant)
        assert not np.array_equal(other["W"], new["W"])
        if variant != "radmm3l":  # the exact W step solves its ridge problem with lam_i
            Vt = scaled.aug(Vleft)
            G = Vt @ Vt.T
            B = (PEN.rho * own["U"] + own["Lam"]) @ Vt.T
            lhs = new["W"] @ (PEN.rho * G + (prob.n * lam_i + PEN.tau) * np.eye(G.shape[0]))
            rhs = B + PEN.tau * own["W"]
            assert np.abs(lhs - rhs).max() <= 1e-10 * np.abs(rhs).max()


def test_hidden_lam_scale_reaches_every_engine_and_the_objective():
    """With ``algorithm.hidden_lam_scale`` the chunked engine (1 and 3 chunks) agrees with the
    reference; the iteration-0 objective counts each block's own weight decay; the default
    RADMM-3 (scale 1) and RADMM-3A (0.1) are what the config says."""
    from daskadmm.config import algorithm_defaults

    assert algorithm_defaults("radmm3").hidden_lam_scale == 1.0
    assert algorithm_defaults("radmm3a").hidden_lam_scale == 0.1
    cfg = _small_reference_cfg(12, 4, hidden_lam_scale=0.2, input_lam_scale=2.0)
    ds = load_dataset(cfg.data, seed=0)
    ref = api.fit(cfg, dataset=ds)
    one = api.fit(replace_sections(cfg, algorithm={"hidden_lam_scale": 1.0,
                                                   "input_lam_scale": 1.0}), dataset=ds)
    assert max(np.abs(a - b).max() for a, b in zip(ref.weights, one.weights, strict=True)) > 1e-4
    # iteration 0: the constraints hold, so L^0 = loss + sum_i (lam_i / 2) ||W_i||^2, which
    # the blocks' own lam_i change
    assert one.history[0]["objective"] != ref.history[0]["objective"]
    for res in _chunked_runs_match(cfg, ds, ref, "hls"):
        assert res.history[0]["objective"] == pytest.approx(ref.history[0]["objective"],
                                                             rel=1e-12)


def test_hidden_lam_scale_is_radmm3s_only():
    """Algorithms outside the RADMM-3 family do not read ``algorithm.hidden_lam_scale`` or
    ``input_lam_scale``:
    setting it leaves their iterates as they were."""
    cfg = from_mapping({"algorithm": {"name": "pdadmm"}, "cluster": {"kind": "reference"},
                        "data": {"name": "synthetic", "n_samples": 60},
                        "model": {"kind": "mlp", "width": 5, "depth": 4},
                        "run": {"iterations": 3, "progress": False}})
    ds = load_dataset(cfg.data, seed=0)
    a = api.fit(cfg, dataset=ds)
    b = api.fit(replace_sections(cfg, algorithm={"hidden_lam_scale": 0.1,
                                                 "input_lam_scale": 3.0}), dataset=ds)
    for x, y in zip(a.weights, b.weights, strict=True):
        assert np.array_equal(x, y)


def test_restart_is_the_start_on_the_current_weights():
    """``restart_every=R``: iteration R+1 starts from RADMM-3A's start on ``W^R`` (forward pass,
    one backward pass) in place of iteration R's auxiliaries and multipliers. A 3-iteration
    run with R = 2 equals, bit for bit, 2 iterations without restarts followed by 1 iteration
    of a run started from their weights; its first two iterations are those without
    restarts, and its third is not."""
    from daskadmm.api import schedule_options
    from daskadmm.config import AlgorithmConfig
    from daskadmm.monitor import Monitor
    from daskadmm.schedules import PenaltySchedule

    prob = make_problem("relu", "resnet", True, "mse", depth=4, n=10)
    splitting = get_algorithm("radmm3a").splitting

    def run(iterations, weights, restart_every):
        seen = []
        schedule = PenaltySchedule(schedule_options(AlgorithmConfig(name="radmm3a")))
        monitor = Monitor(iterations=iterations, eval_every=iterations,
                          evaluate=lambda w: {"train_loss": 0.0, "test_loss": 0.0,
                                              "train_metric": 0.0, "test_metric": 0.0})
        reference.solve(splitting, prob.arch, prob.X, prob.Y, weights, schedule, monitor,
                        Options(relax=1.8, restart_every=restart_every),
                        state_callback=lambda k, st: seen.append(
                            [{v: np.array(a, copy=True) for v, a in s.items()} for s in st]))
        return seen

    def equal(a, b):
        return all(np.array_equal(x[v], y[v]) for x, y in zip(a, b, strict=True) for v in x)

    restarted = run(3, prob.weights, 2)
    plain = run(3, prob.weights, 0)
    assert equal(restarted[0], plain[0]) and equal(restarted[1], plain[1])
    assert not equal(restarted[2], plain[2])
    again = run(1, [s["W"] for s in plain[1]], 0)  # a start on W^2, one iteration
    assert equal(restarted[2], again[0])


def test_restarts_on_dask_match_the_reference(tmp_path):
    """Restarts on every Dask engine: the same chunking (one chunk, state in Zarr or in
    worker memory) equals the reference bit for bit, 3 chunks agree to rounding; a run
    resumed from a checkpoint taken at a restart (iteration 6 of 12, R = 3) restarts there
    as the uninterrupted run does and ends on the same bits."""
    cfg = _small_reference_cfg(10, 5, restart_every=3)
    ds = load_dataset(cfg.data, seed=0)
    ref = api.fit(cfg, dataset=ds)
    plain = api.fit(replace_sections(cfg, algorithm={"restart_every": 0}), dataset=ds)
    assert max(np.abs(a - b).max() for a, b in zip(ref.weights, plain.weights, strict=True)) > 1e-6
    one, _ = _chunked_runs_match(cfg, ds, ref, "restart")
    mem = api.fit(replace_sections(cfg, cluster={"kind": "threads"}, storage={"state": "memory"}),
                  dataset=ds)
    assert mem.info["engine"] == "dask"
    for run in (one, mem):
        assert all(np.array_equal(a, b) for a, b in zip(ref.weights, run.weights, strict=True))

    zcfg = replace_sections(_zarr_cfg(), algorithm={"restart_every": 3})
    ds = load_dataset(zcfg.data, seed=0)
    full = api.fit(replace_sections(zcfg, storage={"url": str(tmp_path / "full.zarr")}),
                   dataset=ds)
    url = tmp_path / "part.zarr"
    part = api.fit(replace_sections(zcfg, storage={"url": str(url)}, run={"iterations": 7}),
                   dataset=ds)
    assert part.iterations == 7
    res = api.fit(replace_sections(zcfg, storage={"url": str(url)}, run={"resume": True}),
                  dataset=ds)
    assert res.info["resumed_from"] == 6 and res.iterations == 12
    _same_weights(full, res)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


def test_restart_keys_end_with_the_run_id():
    """Every task of a restart's start ends with the run id, like every other task of the run
    (what the driver's task accounting and its recovery's quiesce go by), and is tagged with
    the iteration it restarts after, so two restarts' keys differ."""
    from daskadmm.graph import chunked as chunk_graph

    arch = Architecture(kind="resnet", depth=4, d_in=3, width=5, d_out=1, activation="relu")
    weights = init_weights(arch, np.random.default_rng(0))
    slices = [slice(0, 10), slice(10, 20)]
    keys = {}
    for k in (3, 6):
        nodes, roles, outs = chunk_graph.start_nodes(
            "radmm3a", arch, "memory://keys", slices, "abcd1234", weights, 20, None,
            Options(restart_every=3), 2.0, rho_first=(2.0,), restart=k)
        keys[k] = {n.key for n in nodes}
        assert keys[k] and all(kk.endswith("-abcd1234") for kk in keys[k])
        assert all(f"r{k}-" in kk for kk in keys[k])
        assert all(v.endswith("-abcd1234") for v in roles.values() if "-" in v)
    assert not keys[3] & keys[6]


def test_resume_at_a_restart_starts_from_the_checkpoints_weights(tmp_path, monkeypatch):
    """A run resumed from a checkpoint taken at a restart iteration does not copy the
    checkpoint's state back (on a cluster that copy and the restart would write the same slot
    with nothing ordering them): its start is the restart on the checkpoint's weights, into
    that iteration's slot. On a distributed cluster (in this process) it ends on the
    uninterrupted run's bits."""
    from distributed import Client, LocalCluster

    from daskadmm.graph import chunked as chunk_graph

    calls = []
    real = chunk_graph.start_nodes

    def spy(*args, **kw):
        calls.append((args[7], kw.get("restart")))  # (restore, restart)
        return real(*args, **kw)

    monkeypatch.setattr(chunk_graph, "start_nodes", spy)
    zcfg = replace_sections(_zarr_cfg(), algorithm={"restart_every": 3},
                            cluster={"kind": "local"})
    ds = load_dataset(zcfg.data, seed=0)
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                      dashboard_address=None) as lc, Client(lc) as client:
        full = api.fit(replace_sections(zcfg, storage={"url": str(tmp_path / "full.zarr")}),
                       dataset=ds, client=client)
        url = str(tmp_path / "part.zarr")
        api.fit(replace_sections(zcfg, storage={"url": url}, run={"iterations": 7}),
                dataset=ds, client=client)
        calls.clear()
        res = api.fit(replace_sections(zcfg, storage={"url": url}, run={"resume": True}),
                      dataset=ds, client=client)
    assert res.info["resumed_from"] == 6 and res.iterations == 12
    assert calls[0] == (None, 6)  # the start: the restart after 6, no copy of the state
    assert [r for _, r in calls[1:]] == [9]  # then the restart after 9
    _same_weights(full, res)


def test_restart_guard_decides_on_the_objective():
    """:class:`RestartGuard`: a restart whose objective is not above the accepted one is
    accepted (ties included) and becomes the new reference; a higher or non-finite one is
    rejected: the accepted weights come back (a copy, not the caller's arrays), rho and beta
    are raised by ``adapt_factor`` from the next iteration on (capped), and the rejection is
    recorded. Its state survives a manifest's round trip (non-finite numbers as null)."""
    from daskadmm.api import schedule_options
    from daskadmm.config import AlgorithmConfig
    from daskadmm.schedules import PenaltySchedule, RestartGuard

    sched = PenaltySchedule(schedule_options(AlgorithmConfig(
        name="radmm3a", rho=2.0, beta=1.0, adapt_factor=3.0, rho_max=10.0, beta_max=10.0)))
    w0 = [np.ones((2, 3))]
    guard = RestartGuard()
    guard.begin(5.0, w0)
    w0[0][...] = 7.0  # the guard holds its own copy
    w3 = [np.full((2, 3), 3.0)]
    assert guard.decide(3, 5.0, w3, sched) is None  # a tie is accepted
    assert (guard.iteration, guard.objective) == (3, 5.0) and sched.at(4).rho == 2.0
    back = guard.decide(6, 5.5, [np.zeros((2, 3))], sched)
    assert back is not None and np.array_equal(back[0], w3[0])
    assert (sched.at(7).rho, sched.at(7).beta) == (6.0, 3.0)
    assert guard.decide(9, math.nan, [np.zeros((2, 3))], sched) is not None
    assert (sched.at(10).rho, sched.at(10).beta) == (10.0, 9.0)  # rho capped at rho_max
    assert guard.rejected[0] == (6, 5.5, 3) and [r[0] for r in guard.rejected] == [6, 9]
    assert guard.note is not None and "rejected" in guard.note and "rho 10" in guard.note
    state = json.loads(json.dumps(storage_jsonable(guard.state_dict())))
    again = RestartGuard()
    again.load_state_dict(state, guard.weights)
    assert (again.iteration, again.objective) == (3, 5.0)
    assert [r[:1] + r[2:] for r in again.rejected] == [(6, 3), (9, 3)]
    assert math.isnan(again.rejected[1][1])
    assert guard.decide(12, 4.0, [np.full((2, 3), 4.0)], sched) is None
    assert guard.state_dict()["accepted"] == 12 and guard.weights[0][0, 0] == 4.0
    assert guard.note is None and guard.allows(15)
    # at the caps a rejection would run the same iterations again: back to the accepted
    # weights once more, and no restarts after that
    assert guard.decide(15, 4.5, [np.full((2, 3), 5.0)], sched) is not None  # beta 9 -> 10
    assert not sched.can_raise() and guard.stopped is None
    back = guard.decide(18, 4.6, [np.full((2, 3), 6.0)], sched)
    assert back is not None and back[0][0, 0] == 4.0
    assert guard.note is not None and "without further restarts" in guard.note
    assert guard.stopped == 18 and guard.allows(18) and not guard.allows(21)
    assert guard.info()["stopped"] == 18
    again = RestartGuard()
    again.load_state_dict(json.loads(json.dumps(storage_jsonable(guard.state_dict()))),
                          guard.weights)
    assert again.stopped == 18 and not again.allows(21)


def storage_jsonable(obj):
    from daskadmm.storage import _jsonable

    return _jsonable(obj)


def test_a_rejected_restart_starts_again_from_the_accepted_weights():
    """With the guard on, a restart whose objective rose is replaced by the start on the last
    accepted weights with rho and beta doubled (``adapt_factor`` 2). At rho = 0.1 the first
    restart (after iteration 3) is rejected, so iterations 4.. go exactly as a run at rho =
    0.2 from iteration 1 on, bit for bit, including that run's own rejections."""
    from daskadmm.api import schedule_options
    from daskadmm.config import AlgorithmConfig
    from daskadmm.monitor import Monitor
    from daskadmm.schedules import PenaltySchedule

    prob = make_problem("relu", "resnet", True, "mse", depth=4, n=10)
    splitting = get_algorithm("radmm3a").splitting

    def run(rho, iterations):
        seen, rhos = [], []
        schedule = PenaltySchedule(schedule_options(AlgorithmConfig(
            name="radmm3a", rho=rho, beta=rho / 2, lam=0.03)))
        monitor = Monitor(iterations=iterations, eval_every=iterations,
                          evaluate=lambda w: {"train_loss": 0.0, "test_loss": 0.0,
                                              "train_metric": 0.0, "test_metric": 0.0})
        res = reference.solve(
            splitting, prob.arch, prob.X, prob.Y, prob.weights, schedule, monitor,
            Options(relax=1.8, restart_every=3, restart_guard=True, hidden_lam_scale=0.1),
            state_callback=lambda k, st: (seen.append(
                [{v: np.array(a, copy=True) for v, a in s.items()} for s in st]),
                rhos.append(schedule.at(k).rho)))
        return seen, rhos, res.info["restart_guard"]

    small, small_rhos, small_guard = run(0.1, 10)
    big, big_rhos, big_guard = run(0.2, 7)
    assert [r[0] for r in small_guard["rejected"]][:1] == [3]
    assert all(r[2] == 0 for r in small_guard["rejected"])  # each time back to W^0
    assert small_rhos[:3] == [0.1] * 3 and small_rhos[3:] == big_rhos
    for a, b in zip(small[3:], big, strict=True):
        assert all(np.array_equal(x[v], y[v]) for x, y in zip(a, b, strict=True) for v in x)
    # the rho = 0.2 run's rejections are the rho = 0.1 run's later ones, 3 iterations on
    assert [r[0] + 3 for r in big_guard["rejected"]] == [r[0] for r in small_guard["rejected"]][1:]


def test_restarts_stop_when_the_penalties_are_at_their_caps():
    """When a restart is rejected and rho and beta cannot be raised (at rho_max, beta_max),
    the run starts from the accepted weights once more and makes no further restarts: at
    rho = 0.1 = rho_max the restart after 3 is rejected, and iterations 4.. are, bit for bit,
    those of a run without restarts from iteration 1."""
    from daskadmm.api import schedule_options
    from daskadmm.config import AlgorithmConfig
    from daskadmm.monitor import Monitor
    from daskadmm.schedules import PenaltySchedule

    prob = make_problem("relu", "resnet", True, "mse", depth=4, n=10)
    splitting = get_algorithm("radmm3a").splitting

    def run(restart_every, iterations):
        seen = []
        schedule = PenaltySchedule(schedule_options(AlgorithmConfig(
            name="radmm3a", rho=0.1, beta=0.05, lam=0.03, rho_max=0.1, beta_max=0.05)))
        monitor = Monitor(iterations=iterations, eval_every=iterations,
                          evaluate=lambda w: {"train_loss": 0.0, "test_loss": 0.0,
                                              "train_metric": 0.0, "test_metric": 0.0})
        res = reference.solve(
            splitting, prob.arch, prob.X, prob.Y, prob.weights, schedule, monitor,
            Options(relax=1.8, restart_every=restart_every, restart_guard=restart_every > 0,
                    hidden_lam_scale=0.1),
            state_callback=lambda k, st: seen.append(
                [{v: np.array(a, copy=True) for v, a in s.items()} for s in st]))
        return seen, res.info.get("restart_guard")

    guarded, info = run(3, 10)
    plain, _ = run(0, 7)
    assert info["stopped"] == 3 and [r[0] for r in info["rejected"]] == [3]
    for a, b in zip(guarded[3:], plain, strict=True):
        assert all(np.array_equal(x[v], y[v]) for x, y in zip(a, b, strict=True) for v in x)


def test_restart_guard_on_dask_matches_the_reference(tmp_path):
    """The guard's decisions on every Dask engine: a run that rejects restarts (rho = 0.3:
    after iterations 6 and 9) equals the reference bit for bit with one chunk (state in Zarr
    or in worker memory) and to rounding with 3 chunks, with the same rejections."""
    cfg = _small_reference_cfg(10, 5, restart_every=3, rho=0.3, beta=0.2)
    ds = load_dataset(cfg.data, seed=0)
    ref = api.fit(cfg, dataset=ds)
    rejected = [r[0] for r in ref.info["restart_guard"]["rejected"]]
    assert rejected == [6, 9]
    off = api.fit(replace_sections(cfg, algorithm={"restart_guard": False}), dataset=ds)
    assert "restart_guard" not in off.info
    assert max(np.abs(a - b).max() for a, b in zip(ref.weights, off.weights, strict=True)) > 1e-6
    one, three = _chunked_runs_match(cfg, ds, ref, "guard")
    mem = api.fit(replace_sections(cfg, cluster={"kind": "threads"}, storage={"state": "memory"}),
                  dataset=ds)
    for run in (one, mem):  # the same decisions on the same bits
        assert all(np.array_equal(a, b) for a, b in zip(ref.weights, run.weights, strict=True))
        assert run.info["restart_guard"] == ref.info["restart_guard"]
    assert [r[0] for r in three.info["restart_guard"]["rejected"]] == rejected
    # rho and beta at their caps: restarts stop after the first rejection, on Dask as well
    capped = replace_sections(cfg, algorithm={"rho_max": 0.3, "beta_max": 0.2})
    ref = api.fit(capped, dataset=ds)
    assert ref.info["restart_guard"]["stopped"] == 6
    one, _ = _chunked_runs_match(capped, ds, ref, "guard-capped")
    assert all(np.array_equal(a, b) for a, b in zip(ref.weights, one.weights, strict=True))
    assert one.info["restart_guard"] == ref.info["restart_guard"]
    assert [r["rho"] for r in one.history] == [r["rho"] for r in ref.history]


@pytest.mark.parametrize("stop, capped", [(8, False), (10, False), (10, True)])
def test_resume_with_the_restart_guard_is_exact(tmp_path, stop, capped):
    """A guarded run (rho = 0.5: the restart after 9 is rejected, back to iteration 6's
    weights) resumed from checkpoint 6 (before the guard accepts that restart) or 9 (the
    rejected restart: it goes back to the accepted weights the manifest holds) ends on the
    uninterrupted run's bits, with the same decisions; from 9 on a distributed cluster in this
    process. ``capped``: rho and beta at their caps, so restarts stop after 9."""
    from distributed import Client, LocalCluster

    caps = {"rho_max": 0.5, "beta_max": 0.3} if capped else {}
    zcfg = replace_sections(_zarr_cfg(), algorithm={"restart_every": 3, "rho": 0.5, "beta": 0.3,
                                                    **caps})
    ds = load_dataset(zcfg.data, seed=0)
    full = api.fit(replace_sections(zcfg, storage={"url": str(tmp_path / "full.zarr")}),
                   dataset=ds)
    assert [r[:1] + r[2:] for r in full.info["restart_guard"]["rejected"]] == [[9, 6]]
    url = str(tmp_path / "part.zarr")
    api.fit(replace_sections(zcfg, storage={"url": url}, run={"iterations": stop}), dataset=ds)
    cp = json.loads((tmp_path / "part.zarr" / "checkpoint.json").read_text())
    assert cp["iteration"] == stop - stop % 3
    # (committed before the guard decides on that iteration's restart)
    assert cp["restart_guard"]["accepted"] == cp["iteration"] - 3
    # its accepted weights are in the checkpoint slot (checksummed), not in the manifest
    assert "weights" not in cp["restart_guard"] and "b1/Wacc" in cp["checksums"]
    assert (tmp_path / "part.zarr" / "ckpt" / cp["slot"] / "b1" / "Wacc").is_dir()
    lcfg = replace_sections(zcfg, cluster={"kind": "local"}) if stop == 10 else zcfg
    if stop == 10:
        with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                          dashboard_address=None) as lc, Client(lc) as client:
            res = api.fit(replace_sections(lcfg, storage={"url": url}, run={"resume": True}),
                          dataset=ds, client=client)
    else:
        res = api.fit(replace_sections(lcfg, storage={"url": url}, run={"resume": True}),
                      dataset=ds)
    assert res.info["resumed_from"] == stop - stop % 3 and res.iterations == 12
    _same_weights(full, res)
    assert res.info["restart_guard"] == full.info["restart_guard"]
    assert full.info["restart_guard"]["stopped"] == (9 if capped else None)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


def test_a_resume_at_the_last_iteration_takes_no_restart_decision(tmp_path):
    """A run whose last checkpoint is its last iteration, a restart iteration, resumed (as
    after a kill between that commit and the model's save) does not decide on a restart the
    uninterrupted run never takes: no rejection, no raised rho, the same weights."""
    zcfg = replace_sections(_zarr_cfg(), algorithm={"restart_every": 3, "rho": 0.5, "beta": 0.3},
                            run={"iterations": 9})
    ds = load_dataset(zcfg.data, seed=0)
    url = str(tmp_path / "s.zarr")
    full = api.fit(replace_sections(zcfg, storage={"url": url}), dataset=ds)
    res = api.fit(replace_sections(zcfg, storage={"url": url}, run={"resume": True}),
                  dataset=ds)
    assert res.info["resumed_from"] == 9
    assert res.info["restart_guard"]["rejected"] == full.info["restart_guard"]["rejected"] == []
    assert res.info["schedule_changes"] == full.info["schedule_changes"] == []
    _same_weights(full, res)
