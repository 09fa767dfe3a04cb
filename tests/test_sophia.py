"""Sophia (issue 5): step / update_hessian against a float64 hand computation, the estimators
against exact curvature in expectation, state_dict round trip, argument checks."""

import io

import numpy as np
import pytest
import torch

from srl.optim import (
    OPTIMIZERS,
    Sophia,
    build_optimizer,
    gnb_loss,
    gnb_loss_gaussian,
    gnb_num_predictions,
    hutchinson_estimate,
)

SHAPES = [(3, 4), (5,)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add contention (softmax slows 100x on a busy host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
HP = dict(lr=0.05, betas=(0.9, 0.6), rho=0.3, weight_decay=0.2, eps=1e-12)


# ----------------------------------------------------------------------------- hand computation
def reference_run(p0, grads, refreshes, lr, betas, rho, weight_decay, eps, variant=None):
    """The paper's Algorithm 3 in float64 numpy.

    grads[t]: list of gradients for step t; refreshes[t]: None or (kind, estimates, scale),
    applied right after step t. kind "gnb": estimates are gradients, h_hat = scale * g**2;
    kind "raw": h_hat = scale * estimate. Returns final params, per-step win rates.
    variant: negative controls: "no_scale" (GNB estimate not multiplied by B),
    "add_eps" (official code's rho*h + eps: wrong for negative h), "clip_rho" (clip to ±rho).
    """
    b1, b2 = betas
    p = [x.copy() for x in p0]
    m = [np.zeros_like(x) for x in p0]
    h = [np.zeros_like(x) for x in p0]
    wins = []
    for t, g in enumerate(grads):
        clipped = total = 0
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            p[i] = p[i] - lr * weight_decay * p[i]
            denom = rho * h[i] + eps if variant == "add_eps" else np.maximum(rho * h[i], eps)
            r = m[i] / denom
            bound = rho if variant == "clip_rho" else 1.0
            c = np.clip(r, -bound, bound)
            p[i] = p[i] - lr * c
            clipped += int((np.abs(r) >= 1.0).sum())
            total += r.size
        wins.append(1.0 - clipped / total)
        if refreshes[t] is not None:
            kind, est, scale = refreshes[t]
            for i in range(len(p)):
                s = 1.0 if variant == "no_scale" else scale
                hat = s * est[i] ** 2 if kind == "gnb" else s * est[i]
                h[i] = b2 * h[i] + (1 - b2) * hat
    return p, wins


def make_schedule(kind, steps=9, period=3, seed=0):
    rng = np.random.default_rng(seed)
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(steps)]
    refreshes = []
    for t in range(steps):
        if (t + 1) % period:
            refreshes.append(None)
        elif kind == "gnb":  # sampled-label gradients, scale B = 16 predictions
            refreshes.append(("gnb", [rng.normal(scale=0.5, size=s) for s in SHAPES], 16.0))
        else:  # Hutchinson-like estimates, some negative
            refreshes.append(("raw", [rng.normal(loc=0.5, size=s) for s in SHAPES], 1.0))
    p0 = [rng.normal(size=s) for s in SHAPES]
    return p0, grads, refreshes


def run_sophia(p0, grads, refreshes, foreach, dtype=torch.float64, device="cpu", **hp):
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in p0]
    opt = Sophia(params, update_period=3, foreach=foreach, win_rate_every=1, **hp)
    wins = []
    for t, g in enumerate(grads):
        for p, gi in zip(params, g):
            p.grad = torch.tensor(gi, dtype=dtype, device=device)
        opt.step()
        wins.append(opt.win_rate())
        assert opt.hessian_due() == (refreshes[t] is not None)
        if refreshes[t] is not None:
            kind, est, scale = refreshes[t]
            if kind == "gnb":
                for p, e in zip(params, est):
                    p.grad = torch.tensor(e, dtype=dtype, device=device)
                opt.update_hessian(scale=scale)
            else:
                opt.update_hessian([torch.tensor(e, dtype=dtype, device=device) for e in est], scale=scale)
    return [p.detach().double().cpu().numpy() for p in params], wins, opt


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kind", ["gnb", "raw"])
def test_step_matches_float64_hand_computation(kind, foreach):
    p0, grads, refreshes = make_schedule(kind)
    ref, ref_wins = reference_run(p0, grads, refreshes, **HP)
    got, wins, opt = run_sophia(p0, grads, refreshes, foreach, **HP)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(wins, ref_wins, atol=1e-12)
    # The schedule exercises both branches: all-clipped before the first refresh, mixed after.
    assert ref_wins[0] == 0.0 and 0.1 < min(ref_wins[3:]) and max(ref_wins[3:]) < 0.95
    if kind == "raw":
        assert any((h < 0).any() for h in (opt.state[p]["hessian"] for p in opt.param_groups[0]["params"]))
    assert opt.num_steps == 9 and opt.num_hessian_updates == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_foreach_matches_hand_computation(dtype):
    for kind in ("gnb", "raw"):
        p0, grads, refreshes = make_schedule(kind)
        ref, ref_wins = reference_run(p0, grads, refreshes, **HP)
        got, wins, _ = run_sophia(p0, grads, refreshes, True, dtype=dtype, device="cuda", **HP)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        np.testing.assert_allclose(wins, ref_wins, atol=1e-6)


@pytest.mark.parametrize(
    "kind,variant", [("gnb", "no_scale"), ("gnb", "clip_rho"), ("raw", "add_eps"), ("raw", "clip_rho")]
)
def test_negative_controls_fail_the_hand_computation(kind, variant):
    p0, grads, refreshes = make_schedule(kind)
    wrong, _ = reference_run(p0, grads, refreshes, variant=variant, **HP)
    got, _, _ = run_sophia(p0, grads, refreshes, True, **HP)
    assert max(np.abs(a - b).max() for a, b in zip(got, wrong)) > 1e-3


def test_first_step_is_sign_descent():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = Sophia([p], lr=0.1, weight_decay=0.0, win_rate_every=1)
    p.grad = torch.tensor([0.3, -1e-6, 5.0, -2.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 2.9, 0.6]))
    assert opt.win_rate() == 0.0


def test_bf16_params_keep_fp32_state():
    p0, grads, refreshes = make_schedule("gnb")
    _, _, opt = run_sophia(p0, grads, refreshes, True, dtype=torch.bfloat16, **HP)
    for p in opt.param_groups[0]["params"]:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["hessian"].dtype == torch.float32
    # One step from fresh state: the float64 reference on bf16-rounded inputs, rounded to bf16.
    bf = lambda x: torch.tensor(x).to(torch.bfloat16).double().numpy()  # noqa: E731
    ref, _ = reference_run([bf(x) for x in p0], [[bf(g) for g in grads[0]]], [None], **HP)
    got1, _, _ = run_sophia(p0, grads[:1], [None], True, dtype=torch.bfloat16, **HP)
    for a, b in zip(got1, ref):
        np.testing.assert_array_equal(a, bf(b))


# ----------------------------------------------------------------------------- estimators
def _mc_check(samples, exact, z=5.0):
    samples = np.asarray(samples)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    return np.abs(mean - exact) <= z * se + 1e-9, mean, se


def test_gnb_matches_softmax_regression_gauss_newton():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    W = torch.nn.Parameter(0.7 * torch.randn(3, 4, generator=gen, dtype=torch.float64))
    n = X.shape[0]
    with torch.no_grad():
        probs = torch.softmax(X @ W, -1)  # (N, V)
        exact = ((X**2).T @ (probs * (1 - probs)) / n).numpy()  # diag GN of mean CE, (d, V)
    opt = Sophia([W], betas=(0.9, 0.0))  # b2 = 0: h is exactly the last estimate
    draws = []
    for _ in range(3000):
        W.grad = None
        logits = X @ W
        gnb_loss(logits, generator=gen).backward()
        assert gnb_num_predictions(logits) == n
        opt.update_hessian(scale=n)
        draws.append(opt.state[W]["hessian"].clone().numpy())
    assert min(d.min() for d in draws) >= 0.0
    ok, mean, se = _mc_check(draws, exact)
    assert ok.all(), (mean, exact, se)
    assert not _mc_check(np.asarray(draws) / n, exact)[0].all()  # negative control: B omitted


def test_gnb_gaussian_matches_fisher():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    W = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
    log_std = torch.nn.Parameter(torch.tensor([-0.5, 0.3], dtype=torch.float64))
    n = X.shape[0]
    sigma2 = torch.exp(2 * log_std.detach())
    exact_w = ((X**2).mean(0)[:, None] / sigma2[None, :]).numpy()  # (d, A)
    exact_s = np.full(2, 2.0)  # Fisher of log sigma
    dw, ds = [], []
    for _ in range(3000):
        W.grad = log_std.grad = None
        mean = X @ W
        gnb_loss_gaussian(mean, log_std, generator=gen).backward()
        b = gnb_num_predictions(mean)
        dw.append(b * W.grad.numpy() ** 2)
        ds.append(b * log_std.grad.numpy() ** 2)
    assert _mc_check(dw, exact_w)[0].all()
    assert _mc_check(ds, exact_s)[0].all()


def test_gnb_mask_counts_only_kept_predictions():
    logits = torch.randn(4, 5, 7, requires_grad=True)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, :2] = True
    gnb_loss(logits, mask).backward()
    assert gnb_num_predictions(logits, mask) == 8
    assert logits.grad[:, 2:].abs().max() == 0 and logits.grad[:, :2].abs().max() > 0


def test_hutchinson_matches_quadratic_hessian_diagonal():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    A = (a + a.T) / 2  # indefinite: some diagonal entries of the estimate come out negative
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    t1 = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    t2 = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def loss():
        th = torch.cat([t1, t2])
        return 0.5 * th @ A @ th + b @ th

    draws = []
    for _ in range(3000):
        est = hutchinson_estimate(loss(), [t1, t2, unused], generator=gen)
        assert est[2].abs().max() == 0
        draws.append(torch.cat(est[:2]).numpy())
    assert (np.asarray(draws) < 0).any()
    ok, mean, se = _mc_check(draws, torch.diagonal(A).numpy())
    assert ok.all(), (mean, torch.diagonal(A), se)
    avg = torch.cat(hutchinson_estimate(loss(), [t1, t2], num_samples=400, generator=gen)).numpy()
    assert np.abs(avg - torch.diagonal(A).numpy()).max() < 0.6


# ----------------------------------------------------------------------------- state_dict
def _train(model, extra, opt, gen, steps):
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        logits = model(x) + extra.float().sum()
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
        if opt.hessian_due():
            logits = model(x) + extra.float().sum()
            gnb_loss(logits, generator=gen).backward()
            opt.update_hessian(scale=gnb_num_predictions(logits))
            opt.zero_grad()


def _make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    extra = torch.nn.Parameter(torch.full((2,), 0.1, dtype=torch.bfloat16))
    opt = Sophia([{"params": model.parameters()}, {"params": [extra], "lr": 3e-3}], lr=1e-2, update_period=3)
    return model, extra, opt


def test_state_dict_round_trip_is_bit_identical():
    gen = torch.Generator().manual_seed(4)
    model, extra, opt = _make()
    _train(model, extra, opt, gen, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "extra": extra.detach(), "opt": opt.state_dict(), "gen": gen.get_state()}, buf)
    _train(model, extra, opt, gen, 8)  # uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf)
    model2, extra2, opt2 = _make(seed=123)
    model2.load_state_dict(ckpt["model"])
    with torch.no_grad():
        extra2.copy_(ckpt["extra"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.num_steps == 7 and opt2.num_hessian_updates == 2
    assert opt2.state[extra2]["hessian"].dtype == torch.float32
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    _train(model2, extra2, opt2, gen2, 8)  # resumed run

    for a, b in zip(list(model.parameters()) + [extra], list(model2.parameters()) + [extra2]):
        assert torch.equal(a, b)
        for k in ("exp_avg", "hessian"):
            assert torch.equal(opt.state[a][k], opt2.state[b][k])
    assert opt.state[extra]["hessian"].abs().sum() > 0


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.99)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(rho=0.0), "rho"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(eps=0.0), "eps"),
        (dict(update_period=0), "update_period"),
        (dict(update_period=2.5), "update_period"),
        (dict(win_rate_every=-1), "win_rate_every"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        Sophia([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_update_hessian_checks_its_estimate():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Sophia([p])
    with pytest.raises(ValueError, match="entries"):
        opt.update_hessian([torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        opt.update_hessian([torch.ones(4)])
    opt.update_hessian({p: torch.ones(3)}, scale=2.0)
    torch.testing.assert_close(opt.state[p]["hessian"], torch.full((3,), 0.02))


def test_build_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd", "sophia"}
    opt = build_optimizer(params, "sophia", lr=3e-4, betas=[0.9, 0.95], rho=0.05)
    assert isinstance(opt, Sophia) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert isinstance(build_optimizer(params, "AdamW", lr=1e-3), torch.optim.AdamW)
    assert isinstance(build_optimizer(params, "sgd", lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="adam.*adamw.*sgd.*sophia"):
        build_optimizer(params, "lion")
    with pytest.raises(ValueError, match="sophia"):
        build_optimizer(params, "sophia", momentum=0.9)
