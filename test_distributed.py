"""Tests of distributed.py and `torchrun pepo.py`: the one-process identities (fast), and 2 gloo
processes on CPU with FSDP2 (slow; `pytest -m "not slow"` leaves them out):
  - on one fixed rollout batch, pepo.score -> shape -> update on 2 processes leaves the same
    parameters as on 1 process, for every preset;
  - `torchrun --nproc-per-node 2 pepo.py` runs end to end, and its checkpoint loads in one process;
  - SIGTERM stops a 2-process run with a checkpoint; resume needs the same number of processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

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


def test_single_process_global_mean_is_masked_average():
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.rand(4, 5, generator=gen), (torch.rand(4, 5, generator=gen) > 0.3).float()
    assert distributed.global_mean(x, mask) == pepo.masked_average(x, mask).item()


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
    res = {
        "gathered": g.tolist(),
        "shapes": shapes,
        "sum": distributed.all_sum(rank + 1),
        "max": distributed.all_max(float(rank)),
        "true": distributed.all_true(rank == 0),
        "split": [list(distributed.split(n)) for n in (3, 4, 1)],
        "rows": distributed.on_all_rows(lambda a: a.cumsum(0), x).tolist(),
        "any": distributed.any_true(rank == 1),
    }
    # entropy-top over the global batch equals vppo's on the concatenated batch
    gen = torch.Generator().manual_seed(3)
    ent, mask = torch.rand(5, 6, generator=gen), (torch.rand(5, 6, generator=gen) > 0.2).float()
    mask[0:3, 4:] = 0  # rank 0's completions are shorter: one process sees them padded to length 6
    mine, L = (slice(0, 3), 4) if rank == 0 else (slice(3, 5), 6)
    top = distributed.on_all_rows(vppo.entropy_top_mask, ent[mine, :L], mask[mine, :L])
    res["top_equal"] = top.equal(vppo.entropy_top_mask(ent, mask)[mine, :L])
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    else:
        assert res["rows"] == [[4.0, 4.0, 4.0, 2.0, 2.0]] and res["top_equal"], res


# ----------------------------------------------------------------------------------------
# The update: 2 processes with FSDP2 == 1 process, for every preset
# ----------------------------------------------------------------------------------------
CASES = {  # name: pepo.py flags (grey: a perturbation without randomness, so both runs see the same pixels)
    "grpo": ["--algo", "grpo"],
    "dapo": ["--algo", "dapo"],
    "pepo_g": ["--algo", "pepo_g"],
    "pepo_d": ["--algo", "pepo_d", "--micro-batch-size", "2"],
    "vppo": ["--algo", "vppo", "--vppo-perturb", "grey"],
    "dapo_entropy_top": ["--algo", "dapo", "--token-rule", "entropy_top"],
}
# lr 1e-4: Adam's first step is ~lr * g / (|g| + eps), so for gradients near eps = 1e-8 the
# float noise of a different summation order moves a parameter by up to ~lr / 100.
COMMON = ["--group-size", str(G), "--prompts-per-step", str(GROUPS), "--lr", "1e-4", "--steps", "4"]
STEP = 3  # PEPO's ramp is at 1/2: both the plain and the weighted advantage count


def fixed_batch(vl, task, groups) -> dict:
    """A deterministic rollout batch of the given groups: fixed completions (right, wrong, a
    longer one with <think>, a truncated one), so no sampling is involved. Later groups have
    longer completions, so the ranks' batches have different lengths."""
    rows, completions = [], []
    for g in groups:
        ex = tasks.get_task("color").sample(random.Random(500 + g))
        wrong = [c for c in task.labels if c != ex.answer]
        texts = [
            f"<answer>{ex.answer}</answer><|im_end|>",
            f"<answer>{wrong[g % 3]}</answer><|im_end|>",
            f"<think>{'the shape is ' * (g + 1)}</think><answer>{ex.answer}</answer><|im_end|>",
            f"<answer>{wrong[0]}",
        ]
        rows += [ex] * G
        completions += [vl.tok(t, add_special_tokens=False).input_ids for t in texts]
    batch = vl.with_completions(vl.encode_prompts(rows), completions)
    texts = vl.decode(batch["completion_ids"], batch["completion_mask"])
    scores = [task.score(t, ex) for t, ex in zip(texts, rows)]
    batch["rewards"] = torch.tensor([s[0] for s in scores])
    batch["accuracy"] = torch.tensor([s[1] for s in scores])
    batch["texts"], batch["examples"] = texts, rows
    return batch


def one_step(model, ref_model, optimizer, vl, batch, args) -> dict:
    """What pepo.train does with a rollout batch: pepo.score -> pepo.shape -> pepo.update."""
    inputs = {k: batch[k] for k in (*pepo.MODEL_KEYS, "completion_ids", "padding")}
    if args.vppo:
        inputs["pixel_values_perturbed"] = vppo.perturbed_pixel_values(batch, vl.ip, args.vppo_perturb)
    parts = pepo.micro_batches(inputs, args.micro_batch_size)
    reuse = args.ppo_epochs == args.mini_batches == len(parts) == 1 == distributed.world()  # as in pepo.train
    scores = pepo.score(model, ref_model, parts, args, prior=args.pepo, dependency=args.vppo, keep_graph=reuse)
    adv, weights, mask, _, stats = pepo.shape(
        scores, batch["rewards"], batch["completion_mask"], batch["truncated"], STEP, args, batch["padding"]
    )
    stats.update(
        pepo.update(
            model,
            optimizer,
            inputs,
            scores["old_logp"],
            scores["ref_logp"],
            adv,
            weights,
            mask,
            args,
            STEP,
            nullcontext(),
            logits=scores.pop("logits"),
        )
    )
    return stats


def setup(path, flags):
    """Model (sharded under 2 processes), frozen reference when beta > 0, optimizer, as pepo.run builds them."""
    args = pepo.parse_args(flags + COMMON)
    torch.manual_seed(0)
    model, tok, ip = pepo.load_policy(path)
    ref_model = pepo.copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    ref_model = ref_model and distributed.shard(ref_model)
    model = distributed.shard(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    return args, model, ref_model, optimizer, pepo.VLHelper(tok, ip, model.config)


def _sharded_updates(rank, path, out):
    """The collectives first (one spawn for both: starting processes is the slow part); then each
    case: this rank's groups (rank 0: 2, rank 1: 1 + a padding group), one step; rank 0 saves the
    full weights and the stats."""
    _collectives(rank, str(out / "res.json"))
    task, results = tasks.get_task("color"), {}
    for name, flags in CASES.items():
        args, model, ref_model, optimizer, vl = setup(path, flags)
        local = fixed_batch(vl, task, distributed.split(GROUPS))
        batch = distributed.pad_to_global_rows(
            local, pepo.slice_batch(local, slice(0, G)), pepo.concat_batches, vl.pad_id
        )
        stats = one_step(model, ref_model, optimizer, vl, batch, args)
        weights = distributed.full_state_dict(model)
        if rank == 0:
            results[name] = {"weights": weights, "stats": stats}
    if rank == 0:
        torch.save(results, out / "sharded.pt")
    # generate under FSDP2 with different lengths on the two ranks: pepo.generate as it is
    prompts = vl.encode_prompts(batch["examples"][:2])
    completions = pepo.generate(model, vl, prompts, max_new_tokens=2 if rank == 0 else 9, temperature=1.0)
    lengths = distributed.gather_objects(completions.shape[1])
    if rank == 0:
        (out / "generate.json").write_text(json.dumps({"generate_lengths": lengths}))


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """The tiny Qwen2.5-VL without the format warm-up (random weights build in seconds)."""
    return pepo.build_tiny_model(
        str(tmp_path_factory.mktemp("tiny") / "tiny_random"), tasks.get_task("color"), seed=1, warmup_steps=0
    )


@pytest.mark.slow
def test_two_processes_collectives_and_update_equals_one_process(tiny_random, tmp_path):
    task = tasks.get_task("color")
    initial = pepo.load_policy(tiny_random)[0].state_dict()
    reference = {}
    for name, flags in CASES.items():
        args, model, ref_model, optimizer, vl = setup(tiny_random, flags)
        batch = distributed.pad_to_global_rows(
            fixed_batch(vl, task, range(GROUPS)), None, pepo.concat_batches, vl.pad_id
        )
        stats = one_step(model, ref_model, optimizer, vl, batch, args)
        reference[name] = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "stats": stats}
    spawn(_sharded_updates, tiny_random, tmp_path)
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["gathered"] == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]
    assert res["shapes"] == [[2, 3], [1, 5]] and res["sum"] == 3 and res["max"] == 1.0 and res["true"] is False
    assert res["split"] == [[0, 1], [0, 1], [0]]  # rank 0's part of 3, 4 and 1 items
    assert res["rows"] == [[1, 1, 1], [2, 2, 2]] and res["top_equal"] and res["any"] is True
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=False)
    for name in CASES:
        ref, got = reference[name], sharded[name]
        assert set(ref["weights"]) == set(got["weights"])
        diff = max((ref["weights"][k] - got["weights"][k]).abs().max().item() for k in ref["weights"])
        moved = max((ref["weights"][k] - w).abs().max().item() for k, w in initial.items())
        print(f"{name}: max |param 2-proc - 1-proc| = {diff:.2e} (moved up to {moved:.2e})")
        assert diff < 1e-5, (name, diff)
        assert moved > 5e-5  # the update did move the weights: the comparison is not vacuous
        assert set(got["stats"]) == set(ref["stats"])
        for key, value in ref["stats"].items():  # the logged stats are those of the global batch
            assert got["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    lengths = json.loads((tmp_path / "generate.json").read_text())["generate_lengths"]
    assert lengths[0] <= 2 < lengths[1]  # rank 0 finished first and kept stepping until rank 1 was done


# ----------------------------------------------------------------------------------------
# torchrun --nproc-per-node 2 pepo.py
# ----------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent
SMALL = ["--prompts-per-step", "3", "--group-size", "4", "--eval-size", "5", "--max-new-tokens", "8"]  # uneven splits


def torchrun(flags, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(REPO / "pepo.py"),
        *flags,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path):
    out = tmp_path / "run"
    t = time.time()
    proc = torchrun(["--model", "tiny", "--steps", "2", *SMALL, "--output-dir", str(out)])
    log = proc.communicate(timeout=300)[0]
    print(f"torchrun --nproc-per-node 2 pepo.py --steps 2: {time.time() - t:.1f} s")
    assert proc.returncode == 0, log[-3000:]
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["accuracy_after"] <= 1
    assert json.loads((out / "checkpoint" / pepo.TRAINER_JSON).read_text())["world_size"] == 2
    model, _, _ = pepo.load_policy(str(out / "checkpoint"))  # an ordinary checkpoint: one process loads it
    initial = pepo.load_policy(str(out / "tiny_init"))[0].state_dict()
    still = [k for k, v in model.state_dict().items() if v.equal(initial[k])]
    assert not still, still  # every parameter trained, also the root's (embeddings, lm_head) that evaluation gathers


@pytest.mark.slow
def test_torchrun_sigterm_then_resume(tiny_random, tmp_path):
    out = tmp_path / "run"
    flags = ["--model", tiny_random, "--algo", "dapo", "--steps", "3", *SMALL, "--output-dir", str(out)]
    proc = torchrun(flags)
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():  # step 1 is done
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    log = proc.communicate(timeout=120)[0]
    saved = json.loads((out / "checkpoint" / pepo.TRAINER_JSON).read_text())
    assert 1 <= saved["step"] < 3 and saved["world_size"] == 2, log[-3000:]
    assert not (out / "summary.json").exists()
    # another number of processes is refused with one line
    one = subprocess.run(
        [sys.executable, str(REPO / "pepo.py"), "--resume", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert one.returncode == 2 and one.stderr.count("\n") == 1 and "2 process" in one.stderr, one.stderr
    # the same command plus --resume finishes the run
    proc = torchrun([*flags, "--resume", str(out)])
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_torchrun_lora_sigterm_then_resume_matches_uninterrupted(tiny_random, tmp_path):
    """--lora-rank under FSDP2: base and adapters sharded, the reference is the disabled adapter (KL 0 at
    step 1), rank 0 saves only the adapters, the resumed run repeats the uninterrupted one's metrics,
    and the checkpoint loads (merged) in one process."""
    timing = {"seconds", "time_scoring", "time_update"}

    def metrics(out):
        return [{k: v for k, v in m.items() if k not in timing} for m in lines(out / "metrics.jsonl")]

    flags = ["--model", tiny_random, "--algo", "grpo", "--beta", "0.01", "--lora-rank", "4", "--steps", "3", *SMALL]
    flags += ["--entropy-penalty", "0.1"]  # a gradient even when every group's rewards are equal (random weights)
    whole = tmp_path / "whole"
    proc = torchrun([*flags, "--output-dir", str(whole)])
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert [m["step"] for m in metrics(whole)] == [1, 2, 3]
    assert metrics(whole)[0]["kl"] == 0.0 and metrics(whole)[-1]["kl"] > 0  # the adapters moved the policy
    out = tmp_path / "cut"
    proc = torchrun([*flags, "--output-dir", str(out)])
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():  # step 1 is done
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    saved = json.loads((out / "checkpoint" / pepo.TRAINER_JSON).read_text())
    assert 1 <= saved["step"] < 3 and saved["world_size"] == 2, log[-3000:]
    assert not (out / "checkpoint" / "model.safetensors").exists()  # the adapters only
    proc = torchrun([*flags, "--output-dir", str(out), "--resume", str(out)])
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert metrics(out) == metrics(whole)
    merged = pepo.load_policy(str(out / "checkpoint"))[0].state_dict()
    initial = pepo.load_policy(tiny_random)[0].state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed and all(".language_model." in k and k.endswith("_proj.weight") for k in changed)
