"""CATS: the Triton decode MLP (through the interpreter without a GPU), calibration, generation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srl.cli import main as cli_main
from srl.envs.text import SortTask
from srl.generation import PlainSampler, SamplingParams, SpeculativeSampler
from srl.generation.cats_calibration import (ActivationHistogram, apply_cats, calibrate_cats,
                                             load_lm, measure_sparsity, save_lm_checkpoint,
                                             task_batches)
from srl.kernels import cats_mlp
from srl.kernels.cats import (active_rows_reference, cats_mlp_kernel, cats_mlp_reference,
                              transpose_down_storage)
from srl.policies.lm import LMConfig, TransformerLM


def _weights(D, Fh, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: (torch.randn(*s, generator=g) / s[1] ** 0.5).to(dtype)  # noqa: E731
    return w(Fh, D), w(Fh, D), w(D, Fh)


def _threshold(x, wg, keep):
    """A threshold keeping ``keep`` of x's activations, halfway between two of them."""
    a = F.silu(x.double() @ wg.double().T).abs().flatten().sort().values
    if keep == 1.0:
        return 0.0
    if keep == 0.0:
        return float(a[-1]) + 1.0
    i = int(round((1 - keep) * a.numel()))
    return float((a[i - 1] + a[i]) / 2)


def _rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _reference(x, wg, wu, wd, t):
    return cats_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), t)


@pytest.mark.parametrize("M,D,Fh,keep", [(1, 64, 200, 0.5), (3, 48, 77, 0.5), (1, 64, 130, 0.0),
                                         (5, 32, 50, 1.0), (16, 64, 90, 0.5), (2, 40, 33, 0.5)])
def test_kernel_matches_float64_reference(M, D, Fh, keep):
    """F not a multiple of the 16-row tile, D not one of the 32-wide chunk, thresholds keeping
    0%, 50% and 100%; the active-row count is the reference's."""
    wg, wu, wd = _weights(D, Fh)
    x = torch.randn(M, D)
    t = _threshold(x, wg, keep)
    y, active = cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t)
    ref = _reference(x, wg, wu, wd, t)
    n_ref = int(active_rows_reference(x.double(), wg.double(), t))
    assert int(active) == n_ref
    if keep == 0.0:
        assert n_ref == 0 and float(y.abs().max()) == 0.0
    else:
        assert _rel_err(y, ref) < 1e-5
    if keep == 1.0:
        assert n_ref == Fh
        dense = (F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)) @ wd.double().T
        assert _rel_err(y, dense) < 1e-5


def test_kernel_bf16_through_upcast():
    wg, wu, wd = _weights(64, 100, torch.bfloat16)
    x = torch.randn(2, 64).to(torch.bfloat16)
    t = _threshold(x.float(), wg.float(), 0.5)
    y, active = cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, _reference(x, wg, wu, wd, t)) < 2e-2
    assert int(active) == int(active_rows_reference(x.double(), wg.double(), t))


def test_kernel_calls_in_a_row_share_the_workspace():
    """The finish step zeroes the accumulator and counter: consecutive calls stay exact,
    and a down weight in plain (D, F) layout gives the same result."""
    wg, wu, wd = _weights(48, 70)
    for M, keep in ((4, 0.5), (1, 0.3), (7, 0.8), (1, 1.0)):
        x = torch.randn(M, 48)
        t = _threshold(x, wg, keep)
        y, active = cats_mlp_kernel(x, wg, wu, wd if M == 7 else transpose_down_storage(wd), t)
        assert _rel_err(y, _reference(x, wg, wu, wd, t)) < 1e-5
        assert int(active) == int(active_rows_reference(x.double(), wg.double(), t))


def test_failed_launch_leaves_a_clean_workspace(monkeypatch):
    """The gate kernel has counted active rows when the down launch fails: the next call is exact."""
    import srl.kernels.cats as cats

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("launch failed")

    wg, wu, wd = _weights(32, 48)
    x = torch.randn(2, 32)
    t = _threshold(x, wg, 0.5)
    with monkeypatch.context() as m:
        m.setattr(cats, "_cats_down", Broken())
        with pytest.raises(RuntimeError, match="launch failed"):
            cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t)
    y, active = cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t)
    assert _rel_err(y, _reference(x, wg, wu, wd, t)) < 1e-5
    assert int(active) == int(active_rows_reference(x.double(), wg.double(), t))


def test_negative_controls_fail():
    """A wrong threshold, or no threshold in the reference, is caught by the same checks."""
    wg, wu, wd = _weights(64, 120)
    x = torch.randn(1, 64)
    t = _threshold(x, wg, 0.5)
    y, active = cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t)
    wrong, n_wrong = cats_mlp_kernel(x, wg, wu, transpose_down_storage(wd), t * 0.5)
    ref = _reference(x, wg, wu, wd, t)
    assert _rel_err(y, ref) < 1e-5
    assert _rel_err(wrong, ref) > 1e-3
    assert int(n_wrong) != int(active_rows_reference(x.double(), wg.double(), t))
    assert _rel_err(y, _reference(x, wg, wu, wd, 0.0)) > 1e-3  # the dense MLP is a different function


def test_cats_mlp_dispatch_and_input_checks():
    wg, wu, wd = _weights(32, 40)
    x = torch.randn(2, 3, 32)
    t = _threshold(x.reshape(-1, 32), wg, 0.5)
    y, n = cats_mlp(x, wg, wu, wd, t, return_active=True)  # CPU: the torch path
    yk, nk = cats_mlp(x, wg, wu, wd, t, use_kernel=True, return_active=True)
    ref = _reference(x, wg, wu, wd, t)
    assert y.shape == x.shape and _rel_err(y, ref) < 1e-5 and _rel_err(yk, ref) < 1e-5
    assert int(n) == int(nk)
    with pytest.raises(ValueError, match="up_weight"):
        cats_mlp(x, wg, wu[:, :-1], wd, t)
    with pytest.raises(ValueError, match="down_weight"):
        cats_mlp(x, wg, wu, wd.T, t)
    with pytest.raises(ValueError, match="gate_weight"):
        cats_mlp(x, wg.double(), wu, wd, t)
    with pytest.raises(ValueError, match="rows"):
        cats_mlp(torch.randn(17, 32), wg, wu, wd, t, use_kernel=True)


# --------------------------------------------------------------------------- model and config

def _lm(cats=None, seed=0, layers=2):
    torch.manual_seed(seed)
    mlp = {"type": "swiglu", "hidden": 80}
    if cats is not None:
        mlp["cats"] = {"sparsity": cats}
    return TransformerLM(LMConfig(vocab_size=32, d_model=32, n_layers=layers, n_heads=2,
                                  max_seq_len=64, mlp=mlp)).eval()


def test_swiglu_config_and_validation():
    m = _lm()
    assert m.blocks[0].gated is not None and not hasattr(m.blocks[0], "fc")
    assert LMConfig(vocab_size=8).validate().mlp == {"type": "gelu", "hidden": 1024}
    for bad, match in (({"type": "relu"}, "mlp.type"), ({"cats": {"sparsity": 0.5}}, "swiglu"),
                       ({"type": "swiglu", "cats": {"sparsity": 1.5}}, "sparsity"),
                       ({"type": "swiglu", "width": 3}, "unknown")):
        with pytest.raises(ValueError, match=match):
            LMConfig(vocab_size=8, mlp=bad).validate()


def test_enable_cats_keeps_the_function_and_transposes_down():
    m = _lm()
    tokens = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        dense = m(tokens)
        apply_cats(m, [0.0, 0.0])  # threshold 0 keeps every activation
        assert m.blocks[0].gated.down.weight.t().is_contiguous()
        assert torch.allclose(m(tokens), dense, atol=1e-5)
        apply_cats(m, [1e9, 1e9])  # everything zeroed: the MLP adds nothing
        assert not torch.allclose(m(tokens), dense, atol=1e-3)
    with pytest.raises(ValueError, match="thresholds"):
        apply_cats(m, [0.1])


# --------------------------------------------------------------------------- calibration

def test_histogram_threshold_matches_quantile():
    a = torch.randn(50_000).abs() * 0.3
    h = ActivationHistogram()
    h.add(a)
    for s in (0.1, 0.5, 0.9):
        assert abs(float((a <= h.threshold(s)).float().mean()) - s) < 0.002
    assert h.threshold(0.0) == 0.0


def test_calibration_hits_sparsity_on_held_out_activations():
    m = _lm(layers=3)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 32, (8, 48), generator=g) for _ in range(2)]
    held = [torch.randint(0, 32, (8, 48), generator=g) for _ in range(2)]
    for s in (0.3, 0.5, 0.7):
        got = measure_sparsity(m, held, calibrate_cats(m, calib, s))
        assert all(abs(x - s) < 0.02 for x in got), (s, got)
    wrong = measure_sparsity(m, held, calibrate_cats(m, calib, 0.4))  # negative control
    assert not all(abs(x - 0.5) < 0.02 for x in wrong)


def test_calibrate_cli_then_generate_with_cats(tmp_path):
    """srl calibrate-cats stores thresholds beside the checkpoint; mlp.cats loads them; both
    samplers run the thresholded MLP (their log-probs are the CATS model's, not the dense one's)."""
    policy = _lm(cats=0.5)
    save_lm_checkpoint(str(tmp_path), policy)
    with pytest.raises(ValueError, match="thresholds"):
        PlainSampler(policy, 2, 32)
    assert cli_main(["calibrate-cats", str(tmp_path), "--sparsity", "0.5", "--samples", "32",
                     "--task", "sort"]) == 0
    model, path = load_lm(str(tmp_path))
    assert all(b.gated.cats_threshold > 0 for b in model.blocks)
    prompt = torch.randint(3, 16, (2, 9))
    out = PlainSampler(model, 2, 32).generate(prompt, 6)
    seq = torch.cat([prompt, out.tokens], 1)
    with torch.no_grad():
        cats_lp = F.log_softmax(model(seq)[:, 8:-1], -1).gather(-1, out.tokens[..., None])[..., 0]
        apply_cats(model, None)
        dense_lp = F.log_softmax(model(seq)[:, 8:-1], -1).gather(-1, out.tokens[..., None])[..., 0]
    assert torch.allclose(out.logp, cats_lp, atol=1e-4)
    assert not torch.allclose(out.logp, dense_lp, atol=1e-4)
    draft, _ = load_lm(str(tmp_path))
    target, _ = load_lm(str(tmp_path))
    spec = SpeculativeSampler(target, draft, 2, 64, k=2, draft_len=3).generate(prompt, 6)
    assert spec.stats["acceptance_rate"] == 1.0  # same weights, same thresholds: drafts always accepted
    with pytest.raises(ValueError, match="thresholds"):
        SpeculativeSampler(target, _lm(cats=0.5), 2, 64)


def test_task_batches_append_completions():
    m = _lm()
    task = SortTask(length=4)
    batches = task_batches(m, task, 10, 4, np.random.default_rng(0))
    assert [b.shape for b in batches] == [(4, 12), (4, 12), (2, 12)]


@pytest.mark.gpu
def test_gpu_kernel_bf16_and_graph_capture():
    wg, wu, wd = (w.cuda() for w in _weights(4096, 11008, torch.bfloat16))
    wd_t = transpose_down_storage(wd)
    for M in (1, 4, 16):
        x = torch.randn(M, 4096, device="cuda").to(torch.bfloat16)
        t = _threshold(x.float(), wg.float(), 0.5)
        y, active = cats_mlp_kernel(x, wg, wu, wd_t, t)
        assert _rel_err(y, _reference(x, wg, wu, wd, t)) < 2e-2
        assert abs(int(active) - int(active_rows_reference(x.double(), wg.double(), t))) <= 2
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    t = _threshold(x.float(), wg.float(), 0.5)
    y = cats_mlp(x, wg, wu, wd_t, t)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cats_mlp(x, wg, wu, wd_t, t)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = cats_mlp(x, wg, wu, wd_t, t)
    for _ in range(3):
        g.replay()
        assert _rel_err(out, y.double()) < 1e-2
