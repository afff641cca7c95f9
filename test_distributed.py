"""Tests of distributed.py: the one-process identities (fast), and 2 gloo processes on CPU
with FSDP2 giving the same update as one process (slow: `pytest -m slow test_distributed.py`).

The 2-process update below, `sharded_train_step`, is pepo.train_step with the distributed
calls of /work/notes/dist_plan.md put in; the reference is pepo.train_step itself on the
whole batch. Once pepo.py takes those calls, the workers can call pepo.train_step instead.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from contextlib import nullcontext

import pytest
import torch
import torch.multiprocessing as mp

import distributed
import pepo
import tasks
import vppo

G, GROUPS = 4, 3  # 3 groups over 2 ranks: rank 0 gets 2, rank 1 gets 1 plus a padding group


# ----------------------------------------------------------------------------------------
# One process: every helper is the identity of the one-process code
# ----------------------------------------------------------------------------------------
def test_single_process_identities():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.all_sum(x) is x and distributed.all_sum(3) == 3 and distributed.all_max(2.5) == 2.5
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.gather_rows(x)[0] is x and distributed.gather_objects("a") == ["a"]
    assert distributed.split(7) == range(0, 7) and distributed.local_count(16) == 16
    assert distributed.rank_seed(5) == 5
    model = torch.nn.Linear(2, 2)
    assert distributed.shard(model) is model and distributed.saveable(model) is model
    assert distributed.on_all_rows(lambda a: a * 2, x).equal(x * 2)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_single_process_loss_share_equals_pepo(loss_type):
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    denom = distributed.global_denominator(loss_type, mask)
    for rows in (slice(0, 2), slice(2, 6)):
        assert distributed.loss_share(loss_type, mask[rows], denom) == pytest.approx(pepo.loss_share(loss_type, mask[rows], mask))


# ----------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs=2):
    """Run fn(rank, *args) in `nprocs` gloo processes (as torchrun would set them up)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs))
    try:
        mp.spawn(_entry, args=(nprocs, fn, args), nprocs=nprocs)
    finally:
        os.environ.pop("WORLD_SIZE")


def _entry(rank, nprocs, fn, args):
    torch.set_num_threads(1)  # 2 processes on a small machine
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    distributed.init("cpu", timeout_s=120)
    try:
        fn(rank, *args)
    finally:
        distributed.close()


def _collectives(rank, out):
    # rank 0: [2, 3], rank 1: [1, 5] -> global [3, 5] rows in rank order, zero-padded
    x = torch.full((2, 3), 1.0) if rank == 0 else torch.full((1, 5), 2.0)
    g, shapes = distributed.gather_rows(x)
    res = {"gathered": g.tolist(), "shapes": shapes, "sum": distributed.all_sum(rank + 1), "max": distributed.all_max(float(rank)),
           "true": distributed.all_true(rank == 0), "split": [list(distributed.split(n)) for n in (3, 4, 1)],
           "rows": distributed.on_all_rows(lambda a: a.cumsum(0), x).tolist()}
    # entropy-top over the global batch equals vppo's on the concatenated batch
    gen = torch.Generator().manual_seed(3)
    ent, mask = torch.rand(5, 6, generator=gen), (torch.rand(5, 6, generator=gen) > 0.2).float()
    mask[0:3, 4:] = 0  # rank 0's completions are shorter: one process sees them padded to length 6
    mine, L = (slice(0, 3), 4) if rank == 0 else (slice(3, 5), 6)
    top = distributed.on_all_rows(vppo.entropy_top_mask, ent[mine, :L], mask[mine, :L])
    res["top_equal"] = top.equal(vppo.entropy_top_mask(ent, mask)[mine, :L])
    if rank == 0:
        json.dump(res, open(out, "w"))
    else:
        assert res["rows"] == [[4.0, 4.0, 4.0, 2.0, 2.0]] and res["top_equal"], res


@pytest.mark.slow
def test_collectives_two_processes(tmp_path):
    spawn(_collectives, str(tmp_path / "res.json"))
    res = json.load(open(tmp_path / "res.json"))
    assert res["gathered"] == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]
    assert res["shapes"] == [[2, 3], [1, 5]] and res["sum"] == 3 and res["max"] == 1.0 and res["true"] is False
    assert res["split"] == [[0, 1], [0, 1], [0]]  # rank 0's part of 3, 4 and 1 items
    assert res["rows"] == [[1, 1, 1], [2, 2, 2]] and res["top_equal"]


# ----------------------------------------------------------------------------------------
# The update: 2 processes with FSDP2 == 1 process, for every loss aggregation
# ----------------------------------------------------------------------------------------
CASES = {  # name: pepo.py flags (beta 0: no reference model; grey: a perturbation without randomness)
    "grpo": ["--algo", "pepo_g", "--beta", "0"],
    "dapo": ["--algo", "dapo", "--token-rule", "entropy_top", "--micro-batch-size", "2"],
    "dr_grpo": ["--algo", "grpo", "--loss-type", "dr_grpo", "--adv-scale", "none", "--beta", "0"],
    "vppo": ["--algo", "vppo", "--vppo-perturb", "grey"],
}
# lr 1e-4: Adam's first step is ~lr * g / (|g| + eps), so for gradients near eps = 1e-8 the
# float noise of a different summation order (~4e-8 here) moves a parameter by up to ~lr / 100
# (8.7e-6 at lr 1e-3). The gradients themselves are compared directly as well.
COMMON = ["--group-size", str(G), "--prompts-per-step", str(GROUPS), "--lr", "1e-4", "--steps", "4"]


def fixed_batch(vl, task, groups) -> dict:
    """A deterministic rollout batch of the given groups: fixed completions (right, wrong, a
    longer one with <think>, a truncated one), so no sampling is involved. Later groups have
    longer completions, so the ranks' batches have different lengths."""
    rows, completions = [], []
    for g in groups:
        ex = tasks.get_task("color").sample(random.Random(500 + g))
        wrong = [c for c in task.labels if c != ex.answer]
        texts = [f"<answer>{ex.answer}</answer><|im_end|>", f"<answer>{wrong[g % 3]}</answer><|im_end|>",
                 f"<think>{'the shape is ' * (g + 1)}</think><answer>{ex.answer}</answer><|im_end|>", f"<answer>{wrong[0]}"]
        rows += [ex] * G
        completions += [vl.tok(t, add_special_tokens=False).input_ids for t in texts]
    batch = vl.with_completions(vl.encode_prompts(rows), completions)
    texts = vl.decode(batch["completion_ids"], batch["completion_mask"])
    scores = [task.score(t, ex) for t, ex in zip(texts, rows)]
    batch["rewards"] = torch.tensor([s[0] for s in scores])
    batch["accuracy"] = torch.tensor([s[1] for s in scores])
    batch["texts"], batch["examples"] = texts, rows
    return batch


def sharded_train_step(model, optimizer, vl, batch, step, args, generator) -> dict:
    """pepo.train_step with the calls of the integration plan (no reference model, no --visualize).
    Lines marked D differ from pepo.train_step."""
    D = distributed
    mask = batch["completion_mask"].clone()
    if args.overlong_filter:
        mask[batch["truncated"]] = 0
    advantages = pepo.grpo_advantages(batch["rewards"], args.group_size, scale=args.adv_scale)
    inputs = {k: batch[k] for k in (*pepo.MODEL_KEYS, "completion_ids")}
    if args.vppo:
        inputs["pixel_values_perturbed"] = pepo.perturbed_pixels(vl, batch, args.vppo_perturb, generator)
    parts = pepo.micro_batches(inputs, args.micro_batch_size)
    model.eval()
    old, ent, prior, deps = [], [], [], []
    with torch.no_grad():
        for mb in parts:
            logits, hidden = pepo.forward(model, mb, args.temperature, hidden_states=args.pepo)
            logp = pepo.token_logprobs(logits, mb["completion_ids"])
            old.append(logp)
            ent.append(pepo.token_entropy(logits))
            if args.pepo:
                prior.append(pepo.perception_prior(hidden, mb["input_ids"] == model.config.image_token_id, logits.shape[1], args.pepo_score))
            if args.vppo:
                pert, _ = pepo.forward(model, dict(mb, pixel_values=mb["pixel_values_perturbed"]), args.temperature)
                deps.append(vppo.token_visual_dependency(logp, pepo.token_logprobs(pert, mb["completion_ids"])))
    old_logp, entropy = torch.cat(old), torch.cat(ent)
    weights = torch.ones_like(mask)
    stats = {"entropy": D.global_mean(entropy, mask)}  # D
    if args.pepo:
        w = pepo.pepo_token_weights(torch.cat(prior), entropy, mask, args.pepo_alpha, args.pepo_temperature)
        lam = pepo.pepo_ramp(step, args.steps)
        weights = weights * ((1 - lam) + lam * w)
        stats["pepo_w_p50"] = torch.quantile(D.gather_values(w[mask.bool()]), 0.5).item()  # D
    if args.vppo:
        dep = torch.cat(deps)
        keep = vppo.token_gradient_mask(dep, mask, args.vppo_top_frac)
        scale = D.on_all_rows(lambda d, m: vppo.trajectory_advantage_scale(d, m, args.vppo_min_scale), dep, mask)  # D
        weights, advantages = weights * keep, advantages * scale
        real = D.gather_values(scale[~batch["padding"]])  # D: padding rows are not in the one-process batch
        stats.update(tas_min=real.min().item(), tas_mean=real.mean().item(), tas_max=real.max().item())
    if args.token_rule == "entropy_top":
        weights = weights * D.on_all_rows(vppo.entropy_top_mask, entropy, mask)  # D
    denom = D.global_denominator(args.loss_type, mask, D.real_rows(batch))  # D
    tokens = max(1.0, D.all_sum(float(mask.sum())))  # D
    model.train()
    optimizer.zero_grad(set_to_none=True)
    row, finite, loss_stat = 0, True, 0.0
    for mb in parts:
        sl = slice(row, row + mb["input_ids"].shape[0])
        row = sl.stop
        logits, _ = pepo.forward(model, mb, args.temperature)
        logp = pepo.token_logprobs(logits, mb["completion_ids"])
        loss, s = pepo.policy_loss(logp, old_logp[sl], advantages[sl], mask[sl], args.loss_type, args.clip_low, args.clip_high,
                                   token_weights=weights[sl])
        share = D.loss_share(args.loss_type, mask[sl], denom)  # D
        loss = loss * share
        if args.entropy_penalty:
            loss = loss + args.entropy_penalty * (-(logp * mask[sl]).sum() / tokens)  # D: global token count
        loss.backward()
        finite = finite and bool(torch.isfinite(loss))
        loss_stat += share * s["loss"]
    finite = D.all_true(finite)  # D: every rank steps, or none
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # D: a DTensor under FSDP2
    if finite and torch.isfinite(grad_norm):
        optimizer.step()
    stats.update(loss=D.all_sum(loss_stat), grad_norm=grad_norm.item())  # D
    return stats


def _sharded_updates(rank, path, out):
    """Each case: fresh model, shard, this rank's groups (+ padding), one update; rank 0 saves the
    full weights, the stats and the optimizer state; then the checkpoint and generate checks."""
    task = tasks.get_task("color")
    results = {}
    for name, flags in CASES.items():
        args = pepo.parse_args(flags + COMMON)
        torch.manual_seed(0)
        model, tok, ip = pepo.load_policy(path)
        vl = pepo.VLHelper(tok, ip, model.config)
        model = distributed.shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        groups = distributed.split(GROUPS)
        local = fixed_batch(vl, task, groups)
        batch = distributed.pad_to_global_rows(local, local, G, pepo.concat_batches, vl.pad_id)
        t = time.time()
        stats = sharded_train_step(model, optimizer, vl, batch, 1, args, torch.Generator().manual_seed(0))
        stats["seconds"] = time.time() - t
        weights = distributed.full_state_dict(model)
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
        opt_state = distributed.optimizer_state(model, optimizer)
        if rank == 0:
            results[name] = {"weights": weights, "grads": grads, "stats": stats, "optimizer": opt_state}
    if rank == 0:
        torch.save(results, out / "sharded.pt")

    # checkpoint: save_pretrained from the gathered weights (rank 0), loadable by one process
    saveable = distributed.saveable(model)
    if rank == 0:
        pepo.save_atomic(str(out / "checkpoint"), saveable, tok, ip)
    # the optimizer state of the last case, restored into a fresh optimizer on both ranks
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    distributed.load_optimizer_state(model, fresh, opt_state if rank == 0 else {})
    diff = max((fresh.state[p]["exp_avg"].to_local() - optimizer.state[p]["exp_avg"].to_local()).abs().max().item()
               for p in optimizer.state)
    assert diff == 0.0, diff
    # a rank that kept no group (dynamic sampling) runs on copies of a dropped group that carry no loss
    padded = distributed.pad_to_global_rows(None if rank == 1 else local, local, G, pepo.concat_batches, vl.pad_id)
    assert padded["input_ids"].shape[0] == 2 * G and distributed.real_rows(padded) == (2 * G if rank == 0 else 0)
    assert rank == 0 or (padded["completion_mask"].sum() == 0 and padded["padding"].all())
    # generate under FSDP2 with different lengths on the two ranks: pepo.generate as it is
    prompts = vl.encode_prompts(batch["examples"][:2])
    completions = pepo.generate(model, vl, prompts, max_new_tokens=2 if rank == 0 else 9, temperature=1.0)
    lengths = distributed.gather_objects(completions.shape[1])
    if rank == 0:
        json.dump({"generate_lengths": lengths}, open(out / "generate.json", "w"))


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """The tiny Qwen2.5-VL without the format warm-up (random weights build in seconds)."""
    return pepo.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny_random"), tasks.get_task("color"), seed=1, warmup_steps=0)


@pytest.mark.slow
def test_two_process_update_equals_one_process(tiny_random, tmp_path):
    task = tasks.get_task("color")
    initial = pepo.load_policy(tiny_random)[0].state_dict()
    reference = {}
    for name, flags in CASES.items():
        args = pepo.parse_args(flags + COMMON)
        torch.manual_seed(0)
        model, tok, ip = pepo.load_policy(tiny_random)
        vl = pepo.VLHelper(tok, ip, model.config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        batch = fixed_batch(vl, task, range(GROUPS))
        stats = pepo.train_step(model, None, optimizer, vl, batch, 1, args, torch.device("cpu"), nullcontext(), torch.Generator().manual_seed(0))
        reference[name] = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "stats": stats, "model": model,
                           "optimizer": optimizer, "grads": {n: p.grad for n, p in model.named_parameters()}}
    t = time.time()
    spawn(_sharded_updates, tiny_random, tmp_path)
    print(f"2-process part: {time.time() - t:.1f} s")
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=False)
    for name in CASES:
        ref, got = reference[name], sharded[name]
        assert set(ref["weights"]) == set(got["weights"])
        diff = max((ref["weights"][k] - got["weights"][k]).abs().max().item() for k in ref["weights"])
        moved = max((ref["weights"][k] - w).abs().max().item() for k, w in initial.items())
        gdiff = max((ref["grads"][k] - got["grads"][k]).abs().max().item() for k in ref["grads"])
        gmax = max(g.abs().max().item() for g in ref["grads"].values())
        print(f"{name}: max |param 2-proc - 1-proc| = {diff:.2e}, |grad diff| = {gdiff:.2e} (max |grad| {gmax:.2e}); "
              f"stats {({k: round(v, 6) for k, v in got['stats'].items()})}")
        assert diff < 1e-5 and gdiff < 1e-6, (name, diff, gdiff)
        for key in ("loss", "grad_norm", "entropy", "pepo_w_p50", "tas_min", "tas_mean", "tas_max"):
            if key in ref["stats"]:
                assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5, abs=1e-6), (name, key)
        assert moved > 5e-5  # the update did move the weights: the comparison is not vacuous
        # the 2-process optimizer state loads into a one-process optimizer: resuming with another world size
        fresh = torch.optim.AdamW([p for p in ref["model"].parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        distributed.load_optimizer_state(ref["model"], fresh, got["optimizer"])
        names = dict(ref["model"].named_parameters())
        opt_diff = max((fresh.state[names[k]]["exp_avg_sq"] - ref["optimizer"].state[names[k]]["exp_avg_sq"]).abs().max().item()
                       for k in names)
        assert opt_diff < 1e-8, (name, opt_diff)
    # the checkpoint written by rank 0 is an ordinary one-process checkpoint
    model, _, _ = pepo.load_policy(str(tmp_path / "checkpoint"))
    assert max((v - sharded["vppo"]["weights"][k]).abs().max().item() for k, v in model.state_dict().items()) == 0.0
    lengths = json.load(open(tmp_path / "generate.json"))["generate_lengths"]
    print("generate lengths per rank", lengths)
    assert lengths[0] <= 2 < lengths[1]  # rank 0 finished first and kept stepping (synced_gpus) until rank 1 was done
