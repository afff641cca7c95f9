"""Token-level policy optimisation for Qwen-VL models: GRPO, DAPO, PEPO and VPPO, in one file.

    python pepo.py                        # offline: tiny Qwen2.5-VL, PEPO_G on the `color` task
    python pepo.py --algo vppo --steps 50
    python pepo.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --data geo3k.jsonl ...

PEPO (arXiv 2603.22847) turns two signals of the policy into token weights: a perception
prior (cosine similarity between each completion token's hidden state and the image tokens'
hidden states, averaged over layers) and the token entropy, fused by a smooth gate and a
softmax. VPPO (arXiv 2510.09285, building blocks in vppo.py) measures each token's dependency
on the image with a second pass on a perturbed image. GRPO (arXiv 2402.03300) and DAPO
(arXiv 2503.14476) supply the advantages and the clipped surrogate loss.

Read it top to bottom; each section uses only what comes before it:
  §1 arguments and presets          §5 one step: score -> shape -> update
  §2 the math (pure tensor functions) §6 the training loop
  §3 Qwen-VL inputs and outputs     §7 run management: checks, tiny model, checkpoints, main
  §4 rollouts and evaluation
For the algorithms read §2, §5 and §6. Their advantages and token weights differ only in
`shape` (§5); the presets' other differences are flags read elsewhere: dynamic sampling
(collect_rollouts, §4), the loss aggregation, clipping and VPPO's entropy term (update, §5).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import distributed as dist_  # torchrun/FSDP2 helpers: each is the identity in one process
import tasks
import vppo

# ========================================================================================
# §1 Arguments and presets
# ========================================================================================
PERTURBATIONS = vppo.PERTURBATIONS  # (the Args field `vppo` shadows the module inside the class)


ABLATIONS = {  # --ablation NAME: one part of a method switched off or replaced, as in the papers' ablations
    "pepo-prior-only": "the gate sees the perception prior alone",
    "pepo-entropy-only": "the gate sees the entropy alone",
    "pepo-no-ramp": "lambda fixed at 1 from the first step",
    "pepo-additive": "the gate term is added to the prior instead of multiplying it",
    "vppo-tas-only": "advantage shaping (TAS) without the token mask (TGF)",
    "vppo-tgf-only": "the token mask (TGF) without advantage shaping (TAS)",
    "vppo-random-mask": "TGF's top 40% picked at random, without TAS",
    "vppo-entropy-mask": "TGF's top 40% picked by entropy, without TAS",
}


LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of a decoder layer


def arg(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    model: str = arg("tiny", "'tiny' builds a small random Qwen2.5-VL offline; else a save_pretrained folder or hub id")
    algo: str = arg(
        "pepo_g",
        "preset: grpo, dapo, pepo_g (GRPO + PEPO), pepo_d (DAPO + PEPO), vppo (DAPO + VPPO)",
        choices=["grpo", "dapo", "pepo_g", "pepo_d", "vppo"],
    )
    recipe: str = arg(None, "one published run's settings, RECIPES ('list' prints them); flags given win", type=str)
    task: str = arg("color", "toy task from tasks.py ('list' prints them)")
    data: str = arg(None, "train on a JSONL dataset instead of a toy task (ms-swift or EasyR1 format)", type=str)
    image_root: str = arg(
        None, "folder that relative image paths in --data resolve against (default: the file's folder)", type=str
    )
    reward: str = arg(
        "jsonl",
        "reward for --data: jsonl (the project's), pepo, vppo or vppo-format (the authors'; tasks.REWARDS)",
        choices=list(tasks.REWARDS),
    )
    format_prompt: str = arg(
        None,
        "instruction appended to every --data prompt after a blank line: a tasks.FORMAT_PROMPTS name (vppo) or text",
        type=str,
    )
    steps: int = arg(None, "RL steps (one rollout batch and one update each); default: the task's budget", type=int)
    prompts_per_step: int = arg(16, "prompts per rollout batch")
    group_size: int = arg(8, "completions sampled per prompt (G)")
    max_new_tokens: int = arg(24, "completion length limit")
    system: str = arg(
        None, "system message of every prompt (default: the chat template's own, as ms-swift's --system)", type=str
    )
    min_pixels: int = arg(
        None, "scale each smaller image up (aspect kept) to this many pixels first (VPPO: 200704)", type=int
    )
    max_pixels: int = arg(
        None, "scale each larger image down (aspect kept) to this many pixels first (VPPO: 1003520)", type=int
    )
    temperature: float = arg(
        None,
        "sampling temperature; log-probs and entropies use the same one; default: the task's budget (1.0; "
        "color-think 1.2)",
        type=float,
    )
    top_k: int = arg(
        0, "sample only from the k most likely tokens; 0 = off (ms-swift's default, behind PEPO's scripts: 50)"
    )
    top_p: float = arg(1.0, "nucleus sampling; 1.0 = off (VPPO's config: 0.99)")
    lr: float = arg(
        None,
        "AdamW learning rate; default: the task's budget, for the tiny model (use ~1e-6 for real checkpoints)",
        type=float,
    )
    lr_schedule: str = arg(
        None,
        "'cosine' decays the learning rate to 0 over --steps; 'constant' keeps it; default: the task's budget",
        choices=["constant", "cosine"],
    )
    ppo_epochs: int = arg(1, "passes over each rollout batch; 1 with --mini-batches 1 is on-policy (ratio = 1)")
    mini_batches: int = arg(
        1,
        "optimizer steps per pass: the rollout batch is split into this many parts, "
        "whole groups each (VPPO's config: 3)",
    )
    micro_batch_size: int = arg(0, "completions per forward/backward (gradient accumulation); 0 = whole batch")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    weight_decay: float = arg(0.0, "AdamW weight decay (PEPO's scripts via ms-swift: 0.1; VPPO: 0.01)")
    adam_beta2: float = arg(0.999, "AdamW beta2 (PEPO's scripts via ms-swift: 0.95)")
    # GRPO / DAPO knobs; None takes the --algo preset
    beta: float = arg(
        None, "KL weight to the frozen initial policy, k3 estimator (preset: grpo 0.001, dapo 0)", type=float
    )
    clip_low: float = arg(None, "ratio clip epsilon below 1 (preset 0.2)", type=float)
    clip_high: float = arg(None, "ratio clip epsilon above 1 (preset: grpo 0.2, dapo 0.28 'clip-higher')", type=float)
    clip_dual: float = arg(
        None,
        "dual clip C > 1: a token with A < 0 costs at most -C*A (preset: vppo 3, others off); acts only off-policy",
        type=float,
    )
    loss_type: str = arg(
        None,
        "aggregation: grpo (per-sequence mean), dapo (token mean), dr_grpo (sum / (B * --max-new-tokens))",
        choices=["grpo", "dapo", "dr_grpo"],
    )
    adv_scale: str = arg(
        None, "'group' divides advantages by the group std, 'none' does not (Dr. GRPO)", choices=["group", "none"]
    )
    dynamic_sampling: bool = arg(None, "drop groups whose rewards are all equal and sample more (preset: dapo on)")
    max_sampling_tries: int = arg(4, "rollout rounds per step that dynamic sampling may use")
    overlong_filter: bool = arg(None, "mask out completions cut by --max-new-tokens (preset: dapo on)")
    length_penalty_cache: int = arg(
        0, "DAPO soft length penalty: the last N tokens before the limit cost up to -1 reward; 0 = off"
    )
    # PEPO knobs
    pepo: bool = arg(None, "use PEPO token weights (preset: pepo_g, pepo_d)")
    pepo_alpha: float = arg(0.05, "PEPO gate strength alpha (Eq. gate)")
    pepo_temperature: float = arg(1.8, "PEPO softmax temperature tau")
    pepo_score: str = arg(
        "cosine", "similarity between token and image hidden states", choices=["cosine", "dot", "l2", "l1"]
    )
    # VPPO knobs (arXiv 2510.09285)
    vppo: bool = arg(None, "use VPPO: visual dependency from a perturbed-image pass, TAS and TGF (preset: vppo)")
    vppo_top_frac: float = arg(
        0.4, "TGF: fraction of each completion's tokens (most image-dependent) that get gradient"
    )
    vppo_min_scale: float = arg(0.9, "TAS: advantage scale of the least image-dependent completion (beta_min)")
    vppo_max_scale: float = arg(
        0.0, "TAS: cap on the advantage scale; 0 = unbounded, as in the paper (a remedy for outliers, not VPPO's)"
    )
    vppo_perturb: str = arg(
        "blacken",
        "image perturbation for the dependency pass: blacken = half the encoder patches (the paper); "
        "blacken-raw = 14-px blocks of the raw image before the processor's resize (the authors' code)",
        choices=list(PERTURBATIONS),
    )
    vppo_kl: str = arg(
        "k3", "dependency: k3 estimate on the sampled token (paper) or the exact KL", choices=["k3", "exact"]
    )
    entropy_penalty: float = arg(
        None, "weight of mean(-log p) of sampled tokens added to the loss (preset: vppo 0.06)", type=float
    )
    ablation: str = arg(
        "none",
        "one part of a method switched off or replaced, as in the papers' ablations (ABLATIONS in pepo.py says "
        "what each does)",
        choices=["none", *ABLATIONS],
    )
    token_rule: str = arg(
        "none",
        "extra token mask: entropy_top keeps only the top 20%% highest-entropy tokens (arXiv 2506.01939)",
        choices=["none", "entropy_top"],
    )
    # evaluation
    eval_size: int = arg(100, "held-out examples for greedy accuracy before and after RL")
    eval_samples: int = arg(0, "also report avg@K: mean accuracy of K samples per example at --temperature")
    eval_only: bool = arg(False, "evaluate --model and write eval.json, no training")
    eval_every: int = arg(
        0, "every K steps also log greedy held-out accuracy as eval_accuracy in metrics.jsonl; 0 = off"
    )
    visualize: int = arg(
        0, "write tokens.html with per-token signals of N rollouts at the first and last step; 0 = off"
    )
    # bookkeeping
    seed: int = arg(1, "seed for python, torch and the task stream")
    device: str = arg("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    bf16: bool = arg(
        None,
        "bf16 autocast for every forward pass, and the KL reference held in bf16 (default: on with CUDA, off on CPU)",
    )
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the update pass (GPU)")
    freeze_vision: bool = arg(
        False, "do not train the vision tower and its merger (ms-swift's default, behind PEPO's scripts)"
    )
    lora_rank: int = arg(0, "train LoRA adapters of this rank (peft) on a frozen base instead of every weight; 0 = off")
    lora_alpha: float = arg(None, "LoRA alpha: adapters add alpha/rank * B A x (default 2 x --lora-rank)", type=float)
    lora_dropout: float = arg(
        0.0, "dropout on the adapters' input; 0 keeps on-policy ratios at 1 and the first step's KL at 0"
    )
    lora_targets: str = arg(LORA_TARGETS, "the language model's linear layers that get adapters (comma-separated)")
    lora_vision: bool = arg(
        False, "also adapt every linear layer of the vision tower and its merger (default: frozen, as ms-swift)"
    )
    output_dir: str = arg("runs/pepo", "metrics.jsonl, summary.json and checkpoint/ go here")
    save_every: int = arg(
        0, "also write the resumable checkpoint/ every K steps (it is always written at the end and on SIGINT/SIGTERM)"
    )
    resume: str = arg(
        None, "continue the run in this output folder from its checkpoint/, with the run's saved settings", type=str
    )


PRESETS = {
    "grpo": dict(
        beta=0.001,
        clip_low=0.2,
        clip_high=0.2,
        clip_dual=0.0,
        loss_type="grpo",
        adv_scale="group",
        dynamic_sampling=False,
        overlong_filter=False,
        pepo=False,
        vppo=False,
        entropy_penalty=0.0,
    ),
    "dapo": dict(
        beta=0.0,
        clip_low=0.2,
        clip_high=0.28,
        clip_dual=0.0,
        loss_type="dapo",
        adv_scale="group",
        dynamic_sampling=True,
        overlong_filter=True,
        pepo=False,
        vppo=False,
        entropy_penalty=0.0,
    ),
}
PRESETS["pepo_g"] = {**PRESETS["grpo"], "pepo": True}
PRESETS["pepo_d"] = {**PRESETS["dapo"], "pepo": True}
# VPPO as its authors run it: DAPO without the overlong filter, with dual clip 3 and the entropy term.
PRESETS["vppo"] = {**PRESETS["dapo"], "vppo": True, "entropy_penalty": 0.06, "overlong_filter": False, "clip_dual": 3.0}

# --recipe NAME: every knob of one published run (the line in the authors' files is in each comment;
# PEPO: xzxxntxdy/PEPO scripts/train/*.sh @2b1e788 on ms-swift, whose defaults fill what they leave;
# VPPO: huaixuheqing/VPPO-RL examples/configs/config.yaml and its train_vppo_7b.sh / Qwen3-VL-8B script).
# Flags given on the command line win; the --algo preset fills what a recipe leaves unset.
_PEPO_GEO3K = dict(
    model="Qwen/Qwen2.5-VL-3B-Instruct",
    reward="pepo",  # --reward_funcs external_format external_qa_acc; Geometry3K rows carry the format instruction
    steps=263,  # 1 epoch of Geometry3K's 2,101 rows at 8 prompts a step
    prompts_per_step=8,  # 2 per device x 4 accumulation x 8 GPUs = 64 completions = 8 prompts x 8
    group_size=8,  # --num_generations 8
    micro_batch_size=2,  # --per_device_train_batch_size 2
    max_new_tokens=1024,  # --max_completion_length 1024
    temperature=1.0,
    top_k=50,  # ms-swift's default
    top_p=1.0,
    lr=1e-6,
    lr_schedule="cosine",  # ms-swift's default
    weight_decay=0.1,  # ms-swift's default
    adam_beta2=0.95,  # ms-swift's default
    beta=0.001,
    clip_low=0.2,  # ms-swift's default epsilon, both sides
    clip_high=0.2,
    pepo_alpha=0.05,  # --gate_alpha 0.05 (an older version of the scripts: 0.10)
    pepo_temperature=1.8,  # --gate_temperature 1.8
    freeze_vision=True,  # --train_type full leaves ms-swift's frozen ViT and merger frozen
    gradient_checkpointing=True,
    bf16=True,
)
_VPPO_VIRL39K = dict(
    algo="vppo",
    reward="vppo",  # math.py:compute_score_wo_format: accuracy of the last \boxed{}
    format_prompt="vppo",  # math_format_perception.jinja
    prompts_per_step=384,  # rollout_batch_size
    mini_batches=3,  # global_batch_size 128 of 384: 3 optimizer steps per rollout batch
    group_size=8,  # worker.rollout.n=8
    temperature=1.0,
    top_p=0.99,
    lr=1e-6,
    lr_schedule="constant",  # warmup_style constant, warmup 0
    weight_decay=0.01,
    adam_beta2=0.999,  # EasyR1's default betas
    beta=0.0,  # disable_kl: true
    clip_low=0.2,
    clip_high=0.28,
    clip_dual=3.0,  # EasyR1's default clip_ratio_dual
    loss_type="dapo",  # loss_avg_mode token
    dynamic_sampling=True,  # online_filtering on accuracy in (0.01, 0.99) ...
    max_sampling_tries=1000,  # ... with max_try_make_batch -1 (no limit)
    overlong_filter=False,
    vppo_top_frac=0.4,  # top_p_perception_tokens
    vppo_min_scale=0.9,  # advantage_scaling_min
    vppo_perturb="blacken-raw",  # 14-px blocks of the resized image, as their perc_utils
    min_pixels=200704,  # 256 * 28 * 28
    max_pixels=1003520,  # 1280 * 28 * 28
    freeze_vision=False,  # freeze_vision_tower: false
    gradient_checkpointing=True,
    bf16=True,
)
RECIPES = {
    "pepo-geo3k-3b": dict(_PEPO_GEO3K, algo="pepo_g", loss_type="grpo"),  # train_pepo_geometry3k_qwen25vl_3b.sh
    "pepo_d-geo3k-3b": dict(  # train_pepo_d_geometry3k_qwen25vl_3b.sh
        _PEPO_GEO3K,
        algo="pepo_d",
        loss_type="dapo",  # --loss_type bnpo (they normalise per device micro-batch of 2)
        dynamic_sampling=True,  # --dynamic_sample true: at most 3 resamples (ms-swift's max_resample_times)
        max_sampling_tries=4,
        overlong_filter=True,  # --overlong_filter true
    ),
    "vppo-virl39k-7b": dict(  # train_vppo_7b.sh
        _VPPO_VIRL39K,
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        steps=202,  # 2 epochs of ViRL39K's 38,870 rows at 384 prompts a step
        max_new_tokens=2048,  # max_response_length
        entropy_penalty=0.06,
        micro_batch_size=16,  # micro_batch_size_per_device_for_update
    ),
    "vppo-virl39k-qwen3vl-8b": dict(  # the Qwen3-VL-8B script
        _VPPO_VIRL39K,
        model="Qwen/Qwen3-VL-8B-Instruct",
        steps=130,  # trainer.max_steps
        max_new_tokens=8192,  # data.max_response_length
        entropy_penalty=0.12,
        micro_batch_size=4,
    ),
}
# What a recipe cannot reproduce here, one line each (printed under `--recipe list`)
RECIPE_GAPS = [
    "vLLM rollouts (transformers' generate here)",
    "DeepSpeed ZeRO-2 (PEPO) and FSDP with offload (VPPO): FSDP2 under torchrun here",
    "per-device micro-batch normalisers (PEPO_D's bnpo; VPPO's TAS, entropy term): the whole (mini-)batch here",
    "VPPO's filter of prompts over 4,096 tokens",
]


class UsageError(Exception):
    """Bad input the user can fix: main prints `error: <message>` as one line and exits with status 2."""


def apply_budget(args: Args) -> Args:
    """Fill --steps, --lr, --lr-schedule and --temperature left at None from the task's toy budget (Task.budget;
    --data takes JsonlTask's): each toy task's default run is one that learns."""
    task = tasks.TASKS.get(args.task, tasks.JsonlTask) if args.data is None else tasks.JsonlTask
    for key, value in task.budget.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def apply_recipe(args: Args, given: dict) -> Args:
    """Set every knob of --recipe's published run that was not given on the command line."""
    if args.recipe not in RECIPES:
        raise UsageError(
            f"unknown --recipe {args.recipe!r}; choose from {', '.join(RECIPES)} (--recipe list shows them)"
        )
    for key, value in RECIPES[args.recipe].items():
        if key not in given:
            setattr(args, key, value)
    return args


def apply_preset(args: Args) -> Args:
    """Fill every knob left at None from the --algo preset: explicit flags win."""
    for key, value in PRESETS[args.algo].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ========================================================================================
# §2 The math: small pure functions, copy them freely. B = completions, L = completion
# length, T = full sequence length, D = hidden size, V = vocabulary. Masks are 1 on valid
# completion tokens (up to and including the first end token) and 0 on padding.
# ========================================================================================
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages A_i = (R_i - mean_g R) / (std_g R + eps).  [B] -> [B]

    Rows are grouped in consecutive blocks of `group_size`; std_g is the sample std (divisor G - 1,
    torch's default). scale="none" drops the std division (Dr. GRPO,
    arXiv 2503.20783). A group whose rewards are all equal gets exactly 0.
    """
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    flat = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    return adv.masked_fill(flat, 0.0).view(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position.  [B, L, V] -> [B, L]
    `logits` must be already shifted (logits[:, t] is the distribution token t was drawn from)
    and divided by the sampling temperature, as `forward` returns them.
    Entries with p = 0 (e.g. -inf logits) add 0, not 0 * -inf = nan.

    Computed over chunks of ~4M logits (a few dozen positions at V ~ 150k): one float32
    [B, L, V] tensor is 0.6 GB per 1k-token completion, and the formula needs several."""
    step = max(1, 2**22 // max(1, logits.shape[0] * logits.shape[-1]))
    out = []
    for chunk in logits.split(step, dim=1):  # L = 0 gives one empty chunk
        logp = torch.log_softmax(chunk.float(), dim=-1)
        p = logp.exp()
        # masking logp, not p * logp, keeps the gradient finite too
        out.append(-(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1))
    return torch.cat(out, dim=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) under `logits`.  [B, L, V], [B, L] -> [B, L]

    `logits` must be already shifted (logits[:, t] scores tokens[:, t]) and divided by the
    sampling temperature, as `forward` returns them. logit(token) - logsumexp(logits), over
    chunks of positions as in `token_entropy`: no [B, L, V] log_softmax copy, and the backward
    pass needs only chunk-sized temporaries."""
    step = max(1, 2**22 // max(1, logits.shape[0] * logits.shape[-1]))
    out = []
    for chunk, tok in zip(logits.split(step, dim=1), tokens.split(step, dim=1)):
        chunk = chunk.float()
        out.append(chunk.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out, dim=1)


def perception_prior(
    hidden_states, vision_mask: torch.Tensor, completion_len: int, score: str = "cosine"
) -> torch.Tensor:
    """PEPO perception prior VS_t (arXiv 2603.22847, Sec. 3): for each of the last
    `completion_len` positions, the mean similarity between that position's hidden state
    and every image-token hidden state of the same row, averaged over the layers given.

    Which states: pepo.py passes the model's `output_hidden_states`, the embedding output (image
    features in place) plus every decoder layer's output (the last one after the final norm),
    all equally weighted. Which positions: token t's own, the state of the pass that reads o_t
    (its entropy, by contrast, comes from position t - 1's logits, which predicted o_t).

    hidden_states: sequence of [B, T, D]
    vision_mask:   [B, T] bool (or 0/1 integers), True at image-placeholder positions
    returns:       [B, L]; rows without image tokens give 0.

    For cosine and dot, mean_n sim(h, v_n) = h . mean_n(v_n) (after normalising for
    cosine), so one mean vector per row replaces the L x N similarity matrix. Cosine scales
    by 1/|h| instead of writing out normalised copies of every hidden state (~2.5x faster at T ~ 1000).
    """
    vision_mask = vision_mask.bool()  # an integer mask would index rows by 0/1 below, not select them
    vm = vision_mask.float()
    n_vis = vm.sum(dim=1)  # [B]
    w = vm / n_vis.clamp(min=1).unsqueeze(-1)  # [B, T]: 1/N on the row's image tokens, 0 elsewhere
    total = 0.0
    for h in hidden_states:
        h = h.float()
        q = h[:, h.shape[1] - completion_len :]  # [B, L, D]; not h[:, -L:], which is every position when L = 0
        if score == "cosine":
            inv = torch.linalg.vector_norm(h, dim=-1).clamp(min=1e-12).reciprocal()  # [B, T], as F.normalize
            v_mean = torch.einsum("btd,bt->bd", h, w * inv)  # mean of the unit image vectors
            total = total + torch.einsum("bld,bd->bl", q, v_mean) * inv[:, h.shape[1] - completion_len :]
        elif score == "dot":
            total = total + torch.einsum("bld,bd->bl", q, torch.einsum("btd,bt->bd", h, w))
        elif score in ("l2", "l1"):  # distances have no shortcut: one [L, N] matrix per row (ablations)
            dist = torch.zeros(h.shape[0], completion_len, device=h.device)
            for b in n_vis.nonzero().view(-1).tolist():
                dist[b] = torch.cdist(q[b], h[b, vision_mask[b]], p=2.0 if score == "l2" else 1.0).mean(dim=1)
            total = total - dist
        else:
            raise ValueError(f"unknown score {score!r}; choose cosine, dot, l2 or l1")
    prior = total / len(hidden_states)
    return prior * (n_vis > 0).float().unsqueeze(-1)


def masked_minmax(x: torch.Tensor, mask: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Per-row min-max normalisation over valid tokens.  [B, L] -> [B, L] in [0, 1], 0 on padding"""
    if x.shape[1] == 0:  # min/max over an empty dim would raise
        return torch.zeros_like(x)
    big = torch.finfo(x.dtype).max
    lo = x.masked_fill(mask == 0, big).min(dim=1, keepdim=True).values
    hi = x.masked_fill(mask == 0, -big).max(dim=1, keepdim=True).values
    # where, not * mask: in an all-padding row (x - big) / floor is -inf, and -inf * 0 = nan
    return torch.where(mask > 0, (x - lo) / (hi - lo).clamp(min=floor), torch.zeros_like(x))


def masked_average(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1), over `dim` (None: everything).  [B, L] -> [] or reduced

    An all-zero mask gives 0, not nan. With a soft mask whose sum is below 1 the divisor is 1, which
    is why this is not named masked_mean: TRL's and verl's divide by the mask's sum itself."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@torch.no_grad()
def pepo_token_weights(
    prior: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.05,
    temperature: float = 1.8,
    gate_on: str = "both",
    fusion: str = "gate",
) -> torch.Tensor:
    """PEPO token weights (arXiv 2603.22847, Sec. 3.2).  [B, L] x3 -> [B, L]

      V^, H^ = per-row min-max of prior and entropy over valid tokens
      g_t    = 1 + alpha * tanh((V^_t + H^_t) - mean_t(V^ + H^))     smooth gate
      w_t    = T_i * softmax_t(VS_t * g_t / temperature)              over valid tokens
    Row by row (no batch-wide quantity). Needs `masked_minmax`, `masked_average`.

    Weights average exactly 1 over each row's valid tokens and are 0 on padding.
    Computed without gradient: they act like advantages (the authors' code lets
    gradient flow through them; on-policy that gradient sums to zero within a row).
    Ablations (the paper's Sec. 4): gate_on="prior" or "entropy" feeds the gate V^ or H^ alone;
    fusion="add" adds the gate's term to VS_t instead of multiplying: softmax((VS_t + g_t - 1) / tau).
    """
    prior, entropy, mask = prior.float(), entropy.float(), mask.float()
    if mask.shape[1] == 0:  # empty completions: nothing to weight (max over an empty dim would raise)
        return torch.zeros_like(mask)
    fused = {
        "both": lambda: masked_minmax(prior, mask) + masked_minmax(entropy, mask),
        "prior": lambda: masked_minmax(prior, mask),
        "entropy": lambda: masked_minmax(entropy, mask),
    }[gate_on]()
    gate = 1 + alpha * torch.tanh(fused - masked_average(fused, mask, dim=1).unsqueeze(1))
    z = prior * gate if fusion == "gate" else prior + (gate - 1)
    z = (z / temperature).masked_fill(mask == 0, float("-inf"))
    z = z - z.max(dim=1, keepdim=True).values.clamp(min=-1e30)  # rows of all padding stay finite
    e = torch.exp(z) * mask
    return e / e.sum(dim=1, keepdim=True).clamp(min=1e-30) * mask.sum(dim=1, keepdim=True)


def pepo_ramp(step: int, total_steps: int) -> float:
    """lambda of the `step`-th update (1-based): PEPO weights are blended in over training.

    lambda = min(1, (step - 1) / total_steps), as the authors' trainer computes it from a global
    step that is still 0 during the first update: update 1 is plain GRPO/DAPO, update N uses (N-1)/N,
    so within a run of N steps lambda never reaches 1.
    """
    return min(1.0, max(0, step - 1) / max(1, total_steps))


def learning_rate(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Learning rate of `step` (1-based): constant, or cosine base (1 + cos(pi (step - 1) / N)) / 2,
    which starts at `base` and would reach 0 at step N + 1: the last step N still gets
    base (1 - cos(pi / N)) / 2 (0.0245 base for N = 10)."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(1, total_steps)))


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    loss_type="grpo",
    clip_low=0.2,
    clip_high=0.2,
    token_weights=None,
    ref_logp=None,
    beta=0.0,
    clip_dual=0.0,
    max_len=None,
):
    """Clipped surrogate with optional token weights, dual clip and k3 KL.  -> (loss, stats)

    logp, old_logp, mask, token_weights, ref_logp: [B, L]; advantages: [B] or [B, L].
      l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t) * w_t + beta * KL_t
      KL_t = exp(ref - logp) - (ref - logp) - 1                      (k3, unbiased, >= 0)
    Dual clip (clip_dual = C > 1, arXiv 1912.09729, verl's clip_ratio_c): where A_t < 0 the
    clipped term is capped at -C A_t, so a token whose ratio ran far up cannot cost without bound.
    Aggregation: grpo = mean over each row's tokens then over rows; dapo = mean over all
    valid tokens; dr_grpo = sum / (B * max_len), max_len the generation budget (a constant;
    default L), as in Dr. GRPO (arXiv 2503.20783).
    Log-ratios are clamped to [-20, 20] before exp (as verl does for the KL): far-off tokens,
    e.g. from logits like +-1e4, give large finite values instead of inf, and inf * 0 = nan.
    On-policy (old_logp equal to logp, the default one update per rollout batch) every r_t is 1,
    so the clip range, clip-higher and the dual clip change nothing. Needs `masked_average`.
    """
    mask = mask.float()
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    clipped_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    if clip_dual:
        clipped_loss = torch.where(adv < 0, torch.minimum(clipped_loss, -clip_dual * adv), clipped_loss)
    per_token = clipped_loss if token_weights is None else clipped_loss * token_weights
    kl = None
    if ref_logp is not None and beta > 0:
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / max(1, mask.shape[0] * (max_len or mask.shape[1]))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    stats = {"loss": loss.item(), "clip_frac": masked_average(clipped.float(), mask).item()}
    if kl is not None:
        stats["kl"] = masked_average(kl.detach(), mask).item()
    return loss, stats


def loss_share(loss_type: str, micro_mask: torch.Tensor, batch_rows: int, batch_tokens) -> float:
    """Factor that makes the sum of micro-batch losses equal the whole-batch loss: the micro-batch's
    rows (dapo: valid tokens) over the batch's `batch_rows` (`batch_tokens`)."""
    if loss_type == "dapo":
        return micro_mask.sum().item() / max(1.0, float(batch_tokens))
    return micro_mask.shape[0] / batch_rows


# ========================================================================================
# §3 Qwen-VL inputs and outputs: any Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint through
# the Auto classes (no AutoProcessor: its video part needs torchvision).
#
# A batch is a dict of CPU or device tensors, one row per completion, e.g. 2 prompts x G=2:
#   input_ids          [B, P+L]  left-padded prompt (P) then right-padded completion (L)
#   attention_mask     [B, P+L]  0 on padding
#   mm_token_type_ids  [B, P+L]  1 on <|image_pad|> placeholders (Qwen-VL needs it in every pass)
#   pixel_values       [sum of patches, C*2*14*14]   per image, not per row
#   image_grid_thw     [images, 3]                   (t, h, w) patches of each image
#   completion_ids     [B, L], completion_mask [B, L], truncated [B]
# Rows 0-1 hold copies of prompt 0's image and rows 2-3 of prompt 1's, so slice_batch(batch,
# slice(2, 4)) takes rows 2-3, the 3rd and 4th entries of image_grid_thw, and those images'
# patch rows. forward and generate run the vision tower once per distinct image (encode_images)
# and each distinct prompt once (run_prompts), its G completions on copies of its cache.
# ========================================================================================
END_TOKENS = ["<|im_end|>", "<|endoftext|>"]
SUPPRESS_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PAD = "<|image_pad|>"


def read_chat_template(path: str, local_files_only: bool = False) -> str | None:
    """The processor's chat template that a checkpoint keeps next to its tokenizer (chat_template.jinja,
    or chat_template.json's "chat_template"), read as a file: AutoProcessor would need torchvision."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        file = cached_file(path, name, local_files_only=local_files_only, _raise_exceptions_for_missing_entries=False)
        if file:
            text = Path(file).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


@contextmanager
def peft_quietly():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: that
    one warning, which only peft can fix, is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def load_policy(path: str, local_files_only: bool = False):
    """(model, tokenizer, image_processor) from a folder or hub id, the same way for every checkpoint.
    Anything that is not a Qwen-VL checkpoint whose tokenizer has the image token raises UsageError."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():  # a LoRA run's checkpoint (add_lora): the base recorded in it, with the adapters merged in
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model, tokenizer, image_processor = load_policy(base, local_files_only)
        with peft_quietly():
            return PeftModel.from_pretrained(model, path).merge_and_unload(), tokenizer, image_processor
    kw = dict(local_files_only=local_files_only)
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
            raise UsageError(
                f"--model {path}: a {config.model_type} model with no vision tower or image token, not a "
                "Qwen-VL checkpoint; use a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if tokenizer.convert_tokens_to_ids("<|image_pad|>") != config.image_token_id:
            raise UsageError(
                f"--model {path}: its tokenizer has no <|image_pad|> token with the config's image_token_id "
                f"{config.image_token_id}; use the tokenizer saved with the Qwen-VL model"
            )
        tokenizer.chat_template = tokenizer.chat_template or read_chat_template(path, local_files_only)
        if not tokenizer.chat_template:
            raise UsageError(
                f"--model {path}: no chat template (tokenizer_config.json, chat_template.jinja or .json); "
                "copy chat_template.json from the base model's folder into it"
            )
        image_processor = AutoImageProcessor.from_pretrained(path, **kw)  # Pillow backend without torchvision
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:  # missing or broken files, architectures transformers does not know
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(f"--model {path}: cannot be loaded as a Qwen-VL checkpoint ({first})") from None
    return model, tokenizer, image_processor


class VLHelper:
    """Turns task examples into Qwen-VL model inputs: chat prompt, image-token expansion,
    `mm_token_type_ids`, left padding for generation and completion masks."""

    def __init__(self, tokenizer, image_processor, config, system: str | None = None, pixel_range=None):
        self.tok, self.ip, self.system = tokenizer, image_processor, system
        self.pixel_range = pixel_range  # (min, max) pixels each image is scaled into first (aspect kept), or None
        self.image_token_id = config.image_token_id
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.convert_tokens_to_ids("<|endoftext|>")
        )
        vocab = tokenizer.get_vocab()
        self.end_ids = [vocab[t] for t in END_TOKENS if t in vocab]
        self.suppress_ids = sorted(
            {vocab[t] for t in SUPPRESS_TOKENS if t in vocab} | {config.image_token_id, config.video_token_id}
        )

    def chat_text(self, prompt: str) -> str:
        """The prompt through the checkpoint's own chat template, each <image> mark an image part in
        place (the template writes one <|image_pad|> per image). No `system` = the template's default:
        Qwen2-VL's and Qwen2.5-VL's insert "You are a helpful assistant.", Qwen3-VL's none."""
        content = []
        for i, piece in enumerate(prompt.split(tasks.IMAGE)):
            content += [{"type": "image"}] * (i > 0) + [{"type": "text", "text": piece}] * (piece != "")
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages = [*system, {"role": "user", "content": content}]
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_text(self, example: tasks.Example, image_tokens: list[int]) -> str:
        """chat_text with each image's <|image_pad|> repeated to its number of image tokens."""
        pieces = self.chat_text(example.prompt).split(IMAGE_PAD)
        if len(pieces) != len(image_tokens) + 1:
            raise UsageError(
                f"the chat template wrote {len(pieces) - 1} {IMAGE_PAD} for a prompt with {len(image_tokens)} "
                "image(s); use a Qwen-VL chat template"
            )
        return pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(image_tokens, pieces[1:], strict=True))

    def fit(self, image):
        """--min-pixels / --max-pixels: the image scaled (aspect kept) into that range, as VPPO's data pipeline does."""
        return image if self.pixel_range is None else vppo.scale_into_pixel_range(image, *self.pixel_range)

    def encode_prompts(self, examples: list[tasks.Example], images=None) -> dict:
        """Left-padded prompts. `images` (one list per example) replaces the examples' own images."""
        images = images if images is not None else [ex.images for ex in examples]
        flat = [vppo.resize_for_model(self.fit(im), self.ip) for ims in images for im in ims]  # no-op at usual sizes
        vis = self.ip(flat, return_tensors="pt")
        per_image = (vis["image_grid_thw"].prod(-1) // self.ip.merge_size**2).tolist()
        texts, k = [], 0
        for ex, ims in zip(examples, images):
            texts.append(self.prompt_text(ex, per_image[k : k + len(ims)]))
            k += len(ims)
        ids = [self.tok(t).input_ids for t in texts]
        T = max(map(len, ids))
        input_ids = torch.tensor([[self.pad_id] * (T - len(x)) + x for x in ids])
        attention = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
        return dict(
            input_ids=input_ids,
            attention_mask=attention,
            mm_token_type_ids=(input_ids == self.image_token_id).long(),
            pixel_values=vis["pixel_values"],
            image_grid_thw=vis["image_grid_thw"],
        )

    def decode(self, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Completion text up to and including the end token (special tokens dropped)."""
        return self.tok.batch_decode([c[m.bool()] for c, m in zip(completions, mask)], skip_special_tokens=True)

    def with_completions(self, prompts: dict, completions) -> dict:
        """Append completions ([B, L] tensor or lists of ids) to left-padded prompts. The
        completion mask runs up to and including the first end token; a completion with no
        end token is flagged `truncated`."""
        if not torch.is_tensor(completions):
            L = max(map(len, completions))
            completions = torch.tensor([list(c) + [self.pad_id] * (L - len(c)) for c in completions])
        is_end = torch.isin(completions, torch.tensor(self.end_ids))
        truncated = ~is_end.any(dim=1)
        first_end = torch.where(truncated, completions.shape[1] - 1, is_end.float().argmax(dim=1))
        mask = (torch.arange(completions.shape[1]).unsqueeze(0) <= first_end.unsqueeze(1)).float()
        return dict(
            prompts,
            input_ids=torch.cat([prompts["input_ids"], completions], 1),
            attention_mask=torch.cat([prompts["attention_mask"], mask.long()], 1),
            mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(completions)], 1),
            completion_ids=completions,
            completion_mask=mask,
            truncated=truncated,
        )


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def image_copies(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[list, list]:
    """Which images of a batch are copies of each other (the G rows of a group repeat their
    prompt's images) -> (the first image of each distinct image, each image's distinct image).
    Copies are found by size and the sum of the pixels' bit patterns, then confirmed exactly."""
    sizes = image_grid_thw.prod(-1).tolist()
    images = pixel_values.split(sizes)
    bits = pixel_values.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[pixel_values.element_size()])
    sums = torch.stack(
        [rows.sum(dtype=torch.int64) for rows in bits.split(sizes)]
    ).tolist()  # integers: exact, the same for every copy
    first, index, seen = [], [], {}  # (size, sum) -> distinct image
    for i, key in enumerate(zip(map(tuple, image_grid_thw.tolist()), sums)):
        j = seen.get(key)
        if j is None or not torch.equal(images[i], images[first[j]]):
            j = seen[key] = len(first)
            first.append(i)
        index.append(j)
    return first, index


def encode_images(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, copies=None) -> dict:
    """The vision tower's output for a batch's images, run once per distinct image (`copies`:
    image_copies' result, when already known). Returns the `mm_encoder_outputs` that Qwen-VL
    models in transformers 5 take instead of pixel_values; the gradients of an image's copies
    add up in its one output."""
    first, index = copies or image_copies(pixel_values, image_grid_thw)
    images = pixel_values.split(image_grid_thw.prod(-1).tolist())
    out = model.model.get_image_features(torch.cat([images[i] for i in first]), image_grid_thw[first], return_dict=True)
    out.pooler_output = tuple(out.pooler_output[k] for k in index)  # [tokens, D] per image
    if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per image
        out.deepstack_features = [tuple(layer[k] for k in index) for layer in out.deepstack_features]
    return {"image": out}


def model_inputs(model, batch: dict, copies=None) -> dict:
    """The model's keyword arguments for a batch, with its images encoded once each (encode_images)."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k != "pixel_values"}
    if batch["image_grid_thw"].shape[0]:
        inputs["mm_encoder_outputs"] = encode_images(model, batch["pixel_values"], batch["image_grid_thw"], copies)
    return inputs


def images_per_row(batch: dict) -> torch.Tensor:
    """[B] number of images in each row: runs of image-placeholder tokens."""
    types = batch["mm_token_type_ids"]
    return (types.diff(dim=1, prepend=torch.zeros_like(types[:, :1])) == 1).sum(1)


def shared_prompts(batch: dict, prompt_len: int, image_index: list) -> tuple[list, list, list]:
    """Rows with the same prompt tokens and the same images (a group's G completions; image_index:
    each image's distinct image) -> the first row of each distinct prompt, each row's distinct
    prompt, and the images of those first rows."""
    starts = [0, *images_per_row(batch).cumsum(0).tolist()]  # row i holds images starts[i]:starts[i + 1]
    first, index, seen = [], [], {}
    for i, ids in enumerate(batch["input_ids"][:, :prompt_len].tolist()):
        key = (tuple(ids), tuple(image_index[starts[i] : starts[i + 1]]))
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        index.append(seen[key])
    return first, index, [j for i in first for j in range(starts[i], starts[i + 1])]


def prompt_layout(model, batch: dict, always: bool = False) -> dict:
    """How a batch's rows share their prompts, worked out once per batch (the policy and the
    reference pass of a step reuse it): "copies" (image_copies), and when rows repeat a prompt
    (or `always`), "first"/"index"/"images" (shared_prompts) and the rows' M-RoPE
    "position_ids" [3, B, T]. A batch without completion_ids is all prompt (generate)."""
    L = batch["completion_ids"].shape[1] if "completion_ids" in batch else 0
    grid = batch["image_grid_thw"]
    if not always and (L == 0 or grid.shape[0] == 0):
        return {}
    copies = image_copies(batch["pixel_values"], grid) if grid.shape[0] else ([], [])
    first, index, images = shared_prompts(batch, batch["input_ids"].shape[1] - L, copies[1])
    if not always and len(first) == len(index):  # nothing repeats
        return {"copies": copies}
    ids, types, mask = batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"]
    if L == 0:  # rows with the same prompt have the same positions: work them out once per prompt
        position_ids, _ = model.model.get_rope_index(
            ids[first], types[first], image_grid_thw=grid[images], attention_mask=mask[first]
        )
        position_ids = position_ids[:, index]
    else:
        position_ids, _ = model.model.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
    return dict(copies=copies, first=first, index=index, images=images, position_ids=position_ids)


def run_prompts(model, batch: dict, P: int, layout: dict, hidden_states: bool = False):
    """Each distinct prompt of a batch once (its first P tokens, with its images; layout: see
    prompt_layout) -> the model's output, its attention cache copied to every row of the batch."""
    first, index, images, position_ids = layout["first"], layout["index"], layout["images"], layout["position_ids"]
    ids, mask, types, grid = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
    )
    prompt = dict(input_ids=ids[first, :P], attention_mask=mask[first, :P], mm_token_type_ids=types[first, :P])
    if images:
        pixels = batch["pixel_values"].split(grid.prod(-1).tolist())
        prompt.update(
            image_grid_thw=grid[images],
            mm_encoder_outputs=encode_images(model, torch.cat([pixels[j] for j in images]), grid[images]),
        )
    head = model(
        **prompt,
        position_ids=position_ids[:, first, :P],
        output_hidden_states=hidden_states,
        logits_to_keep=1,
        use_cache=True,
    )
    if len(first) < len(index):
        # its prompt's keys and values for every row
        head.cache.batch_select_indices(torch.tensor(index, device=ids.device))
    return head


def forward(model, batch: dict, temperature: float = 1.0, hidden_states: bool = False, layout: dict | None = None):
    """The one forward helper (training pass, scoring pass, reference and perturbed passes).

    Returns completion logits [B, L, V] divided by the sampling temperature (position t-1
    predicts token t), and the hidden states [B, T, D] per layer when asked.
    The G rows of a group repeat one prompt: the prompt runs once, with its images, and each
    row's completion runs on a copy of its attention cache. Logits and hidden states are those
    of the full rows (to float rounding); the gradients of the copies add up in the shared pass.
    `layout`: prompt_layout(model, batch), when already known.
    """
    layout = prompt_layout(model, batch) if layout is None else layout
    L = batch["completion_ids"].shape[1]
    P = batch["input_ids"].shape[1] - L
    if (
        "first" not in layout or model.is_activation_checkpointing
    ):  # nothing to share (or checkpointing, which would redo the cache)
        out = model(
            **model_inputs(model, batch, layout.get("copies")),
            output_hidden_states=hidden_states,
            logits_to_keep=L + 1,
            use_cache=False,
        )
        # in place: no second [B, L + 1, V] copy; autograd allows it, the lm_head matmul does not save its output
        return out.logits.div_(temperature)[:, :-1], (out.hidden_states if hidden_states else None)
    index, position_ids = layout["index"], layout["position_ids"]
    head = run_prompts(model, batch, P, layout, hidden_states)
    tail = model(
        input_ids=batch["input_ids"][:, P:],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids[:, :, P:],
        cache=head.cache,
        output_hidden_states=hidden_states,
        use_cache=False,
    )
    logits = torch.cat([head.logits[index], tail.logits[:, :-1]], 1).div_(temperature)
    hidden = (
        [torch.cat([h[index], t], 1) for h, t in zip(head.hidden_states, tail.hidden_states)] if hidden_states else None
    )
    return logits, hidden


def slice_batch(batch: dict, rows: slice) -> dict:
    """Rows of a batch; pixel_values/image_grid_thw are per image, so slice those by image."""
    n_img = images_per_row(batch)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=n_img.device), n_img.cumsum(0)])
    img = slice(int(starts[rows.start]), int(starts[rows.stop]))
    patches = batch["image_grid_thw"].prod(-1)
    pstarts = torch.cat([torch.zeros(1, dtype=torch.long, device=patches.device), patches.cumsum(0)])
    pix = slice(int(pstarts[img.start]), int(pstarts[img.stop]))
    B = batch["input_ids"].shape[0]
    out = {k: (v[rows] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == B else v) for k, v in batch.items()}
    out["image_grid_thw"] = batch["image_grid_thw"][img]
    for key in ("pixel_values", "pixel_values_perturbed"):
        if key in batch:
            out[key] = batch[key][pix]
    return out


def repeat_rows(batch: dict, n: int) -> dict:
    """Each row n times in a row, with its images: a prompt encoded once for its G completions."""
    rows = [slice_batch(batch, slice(i, i + 1)) for i in range(batch["input_ids"].shape[0])]
    return {k: torch.cat([r[k] for r in rows for _ in range(n)]) for k in batch}


def micro_batches(batch: dict, size: int):
    B = batch["input_ids"].shape[0]
    size = size or B
    return [slice_batch(batch, slice(i, min(i + size, B))) for i in range(0, B, size)]


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next-token logits [B, V] -> the logits sampling draws from [B, V]: divided by the temperature,
    then -inf outside the top_k likeliest tokens and outside the smallest set holding top_p of the
    probability (in that order, as transformers' sampling does)."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the likeliest token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    vl: VLHelper,
    prompts: dict,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample completions for left-padded prompts -> [B, L] token ids, pad after a row's end token.
    Each distinct prompt runs once (run_prompts: a group's G rows share it), then every row takes
    one token per step on its copy of the cache. Log-probs are later taken at `temperature` over
    the full vocabulary, as TRL, ms-swift and verl do, also when top_k / top_p truncate sampling.
    Under torchrun every rank steps until all are done (FSDP2 runs each forward on all ranks)."""
    B, P = prompts["input_ids"].shape
    layout = prompt_layout(model, prompts, always=True)
    out = run_prompts(model, prompts, P, layout)
    cache, logits = out.cache, out.logits[layout["index"], -1].float()
    # [B] text after the prompt goes on from its largest position
    position = layout["position_ids"].amax(dim=(0, 2)) + 1
    mask, device = prompts["attention_mask"], prompts["input_ids"].device
    suppress, ends = torch.tensor(vl.suppress_ids, device=device), torch.tensor(vl.end_ids, device=device)
    tokens, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    while True:
        if len(tokens) < max_new_tokens and not done.all():
            logits[:, suppress] = float("-inf")  # placeholders and vision tokens are never sampled
            token = (
                logits.argmax(-1)
                if greedy
                else torch.multinomial(sampling_logits(logits, temperature, top_k, top_p).softmax(-1), 1)[:, 0]
            )
            token = token.masked_fill(done, vl.pad_id)
            tokens.append(token)
            done |= torch.isin(token, ends)
        if dist_.all_true(
            len(tokens) == max_new_tokens or bool(done.all())
        ):  # a rank that is done steps on until all are
            break
        mask = F.pad(mask, (0, 1), value=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position.view(1, B, 1).expand(3, B, 1),
            cache=cache,
            use_cache=True,
        )
        cache, logits, position = out.cache, out.logits[:, -1].float(), position + 1
    dist_.reshard(model)  # FSDP2 keeps the root's weights gathered after a forward without backward
    return torch.stack(tokens, 1).cpu()


# ========================================================================================
# §4 Rollouts and evaluation
# ========================================================================================
def rollout(model, vl, task, examples, group_size, args, device, autocast):
    """G completions per example -> batch dict (CPU tensors) with rewards and accuracy [B]."""
    rows = [ex for ex in examples for _ in range(group_size)]
    # the processor runs once per prompt
    prompts = to_device(repeat_rows(vl.encode_prompts(examples), group_size), device)
    model.eval()
    with autocast:
        completions = generate(
            model, vl, prompts, args.max_new_tokens, args.temperature, top_k=args.top_k, top_p=args.top_p
        )
    batch = vl.with_completions({k: v.cpu() for k, v in prompts.items()}, completions)
    texts = vl.decode(completions, batch["completion_mask"])
    scores = [task.score(t, ex) for t, ex in zip(texts, rows)]
    batch["rewards"] = torch.tensor([s[0] for s in scores])
    batch["accuracy"] = torch.tensor([s[1] for s in scores])
    batch["texts"], batch["examples"] = texts, rows
    if args.length_penalty_cache > 0:  # DAPO soft overlong punishment, in [-1, 0]
        n = batch["completion_mask"].sum(1)
        start = args.max_new_tokens - args.length_penalty_cache
        batch["rewards"] += (-(n - start).clamp(min=0) / args.length_penalty_cache).clamp(min=-1)
    return batch


def concat_batches(batches: list[dict], pad_id: int) -> dict:
    """Stack rollout batches of different lengths (prompts left-padded, completions right-padded)."""
    if len(batches) == 1:
        return batches[0]
    P = max(b["input_ids"].shape[1] - b["completion_ids"].shape[1] for b in batches)
    L = max(b["completion_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            v, Lb = b[key], b["completion_ids"].shape[1]
            Pb = b["input_ids"].shape[1] - Lb
            if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                fill = pad_id if key == "input_ids" else 0
                v = torch.cat([torch.full((v.shape[0], P - Pb), fill), v, torch.full((v.shape[0], L - Lb), fill)], 1)
            elif key in ("completion_ids", "completion_mask"):
                v = F.pad(v, (0, L - Lb), value=pad_id if key == "completion_ids" else 0)
            parts.append(v)
        out[key] = sum(parts, []) if isinstance(parts[0], list) else torch.cat(parts)
    return out


def select_groups(batch: dict, keep: torch.Tensor, group_size: int, pad_id: int) -> dict:
    """The groups (blocks of `group_size` consecutive rows) of a rollout batch where keep[g] is True."""
    parts = [slice_batch(batch, slice(g * group_size, (g + 1) * group_size)) for g in keep.nonzero().view(-1).tolist()]
    return concat_batches(parts, pad_id)


def collect_rollouts(model, vl, task, rng, args, device, autocast):
    """One rollout batch. With dynamic sampling (DAPO) groups whose rewards are all equal
    carry no signal: they are dropped and fresh prompts are sampled, up to a cap of tries.
    -> (batch or None, per-row reward/accuracy/completion_len/truncated_frac of every rollout, groups dropped).
    Under torchrun --prompts-per-step counts over all ranks, and so do the tries."""
    G, kept, seen, dropped = args.group_size, [], [], 0
    for _ in range(args.max_sampling_tries if args.dynamic_sampling else 1):
        need = args.prompts_per_step - dist_.all_sum(sum(b["input_ids"].shape[0] for b in kept) // G)  # global count
        if need <= 0:
            break
        n = dist_.local_count(need)  # this rank's prompts; a group stays on one rank
        # generate runs on every rank
        batch = rollout(model, vl, task, [task.sample(rng) for _ in range(max(n, 1))], G, args, device, autocast)
        if n == 0:  # that rollout only kept the ranks in step
            continue
        seen.append(batch)
        if not args.dynamic_sampling:
            kept.append(batch)
            break
        r = batch["rewards"].view(-1, G)
        keep = r.max(1).values > r.min(1).values
        dropped += int((~keep).sum())
        if keep.any():
            kept.append(select_groups(batch, keep, G, vl.pad_id))
    per_row = {
        "reward": [b["rewards"] for b in seen],
        "accuracy": [b["accuracy"] for b in seen],
        "completion_len": [b["completion_mask"].sum(1) for b in seen],
        "truncated_frac": [b["truncated"].float() for b in seen],
    }
    seen = {
        k: dist_.gather_values(torch.cat(v or [torch.zeros(0)])) for k, v in per_row.items()
    }  # every rank's rollouts, for the logged means
    kept = concat_batches(kept, vl.pad_id) if kept else None
    # Equal rows on every rank (FSDP2 runs each forward and backward on all ranks together): a rank
    # with fewer groups appends copies of one of its rollouts that carry no loss (batch["padding"]).
    return (
        dist_.pad_to_global_rows(kept, slice_batch(batch, slice(0, G)), concat_batches, vl.pad_id),
        seen,
        dist_.all_sum(dropped),
    )


@torch.no_grad()
def evaluate(model, vl, task, examples, args, device, autocast, samples: int = 0, batch_size: int = 64) -> dict:
    """Greedy accuracy; with samples=K also avg@K at the sampling temperature. Sampling uses
    its own seeded torch RNG (forked), so evaluating never shifts the training streams."""
    model.eval()
    greedy, sampled, failures = [], [], tasks.GRADER.failures
    mine = [examples[i] for i in dist_.split(len(examples))]  # this rank's part of the examples
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    chunks += [[]] * (dist_.all_max(len(chunks)) - len(chunks))  # as many generate calls on every rank (FSDP2)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(dist_.rank_seed(args.seed))  # ranks sample different avg@K completions
        for chunk in chunks:
            for k, greedy_mode in [(1, True)] + [(samples, False)] * (samples > 0):
                rows = [ex for ex in chunk for _ in range(k)]
                prompts = to_device(
                    repeat_rows(vl.encode_prompts(chunk or examples[:1]), k), device
                )  # [] -> a stand-in, scored nowhere
                with autocast:
                    comp = generate(
                        model,
                        vl,
                        prompts,
                        args.max_new_tokens,
                        args.temperature,
                        greedy=greedy_mode,
                        top_k=args.top_k,
                        top_p=args.top_p,
                    )
                mask = vl.with_completions({k2: v.cpu() for k2, v in prompts.items()}, comp)["completion_mask"]
                texts = vl.decode(comp, mask)
                accs = [task.score(t, ex)[1] for t, ex in zip(texts, rows)]
                (greedy if greedy_mode else sampled).extend(accs)
    out = {"accuracy": dist_.all_sum(sum(greedy)) / dist_.all_sum(len(greedy))}  # over every rank's examples
    out["grade_failures"] = dist_.all_sum(tasks.GRADER.failures - failures)  # --data: gradings that hung or failed
    if samples:
        out[f"avg@{samples}"] = dist_.all_sum(sum(sampled)) / dist_.all_sum(len(sampled))
    return out


# ========================================================================================
# §5 One step: score -> shape -> update. Every algorithm runs these three functions; the
# flags decide which signals `score` computes and how `shape` uses them.
# ========================================================================================
@contextmanager
def reference_policy(model, ref_model):
    """`with reference_policy(model, ref_model) as ref:` ref is the frozen initial policy of the KL term.
    Full fine-tuning: ref_model, a frozen copy. LoRA: ref_model is the peft wrapper of `model` (add_lora),
    and the reference is `model` with its adapters switched off, as TRL does: no second copy of the weights."""
    if not hasattr(ref_model, "disable_adapter"):
        yield ref_model
        return
    with ref_model.disable_adapter():
        yield model


def score(
    model, ref_model, parts: list[dict], args: Args, prior: bool, dependency: bool, keep_graph: bool = False
) -> dict:
    """Step 2: the passes over one rollout batch (already split into micro-batches) that the
    shaping needs, all from the rollout policy, without gradient. -> dict of [B, L] tensors:

      old_logp, entropy   log pi_old(o_t) and H_t, at the sampling temperature
      prior               PEPO perception prior VS_t, from the same pass's hidden states
      ref_logp            the frozen reference policy, for the KL term (when beta > 0)
      dependency          VPPO visual dependency S_t, from a pass on the perturbed images
    Signals not asked for are None. keep_graph (on-policy, one micro-batch): the policy pass
    runs with gradient and its logits are returned as "logits", so the update reuses them
    instead of running the same forward again (TRL does the same); old_logp is their detached copy.
    """
    model.train(keep_graph)  # the same computation either way (no dropout); train() for the pass the update reuses
    out = {"old_logp": [], "entropy": [], "prior": [], "ref_logp": [], "dependency": [], "logits": []}
    for mb in parts:
        layout = prompt_layout(model, mb)  # once for the policy and the reference pass
        with torch.set_grad_enabled(keep_graph):
            logits, hidden = forward(model, mb, args.temperature, hidden_states=prior, layout=layout)
        if keep_graph:
            out["logits"].append(logits)
            logits, hidden = logits.detach(), hidden and [h.detach() for h in hidden]
        with torch.no_grad():
            logp = token_logprobs(logits, mb["completion_ids"])
            out["old_logp"].append(logp)
            out["entropy"].append(token_entropy(logits))
            if prior:
                vision = mb["input_ids"] == model.config.image_token_id
                out["prior"].append(perception_prior(hidden, vision, logits.shape[1], args.pepo_score))
            if ref_model is not None:
                with reference_policy(model, ref_model) as ref:
                    ref_logits = forward(ref, mb, args.temperature, layout=layout)[0]
                out["ref_logp"].append(token_logprobs(ref_logits, mb["completion_ids"]))
            if dependency:
                logits_pert, _ = forward(model, dict(mb, pixel_values=mb["pixel_values_perturbed"]), args.temperature)
                out["dependency"].append(
                    vppo.token_visual_kl(logits, logits_pert)
                    if args.vppo_kl == "exact"
                    else vppo.token_visual_dependency(logp, token_logprobs(logits_pert, mb["completion_ids"]))
                )
    return {k: torch.cat(v) if v else None for k, v in out.items()}


# The shaping steps: one per method, each the equation it implements with its ablations beside it.
# Batch-wide quantities (TAS's min/max/mean, the entropy-top threshold) are taken over every rank's
# rows: dist_.on_all_rows gathers them under torchrun and is the plain call in one process.
def pepo_weights(scores: dict, mask: torch.Tensor, args: Args) -> torch.Tensor:
    """PEPO's w_t = T_i softmax_t(VS_t g_t / tau), g_t the entropy gate (Sec. 3.2).  -> [B, L]
    Ablations: pepo-prior-only / pepo-entropy-only feed the gate one signal; pepo-additive adds
    the gate's term instead of multiplying."""
    gate_on = {"pepo-prior-only": "prior", "pepo-entropy-only": "entropy"}.get(args.ablation, "both")
    fusion = "add" if args.ablation == "pepo-additive" else "gate"
    return pepo_token_weights(
        scores["prior"], scores["entropy"], mask, args.pepo_alpha, args.pepo_temperature, gate_on, fusion
    )


def pepo_blend(w: torch.Tensor, step: int, args: Args) -> tuple[torch.Tensor, float]:
    """PEPO's token factor (1 - lambda) + lambda w_t (Eq. 6), so A_{i,t} = ((1 - lambda) + lambda w_t) A_i.
    lambda = (k - 1) / N ramps w_t in (update 1 is plain GRPO/DAPO; it never reaches 1);
    ablation pepo-no-ramp: lambda = 1.  -> ([B, L], lambda)"""
    lam = 1.0 if args.ablation == "pepo-no-ramp" else pepo_ramp(step, args.steps)
    return (1 - lam) + lam * w, lam


def vppo_token_filter(tgf: torch.Tensor, scores: dict, mask: torch.Tensor, step: int, args: Args) -> torch.Tensor:
    """VPPO's Token Gradient Filtering (Sec. 3.3): `tgf`, 1 on the top ceil(0.4 T_i) tokens of each
    completion by S_t, is the token mask. Ablations put another mask in its place: as many tokens
    at random (a seeded stream of its own, per rank) or by entropy, or every token (TAS alone)."""
    if args.ablation == "vppo-random-mask":
        generator = torch.Generator().manual_seed(dist_.rank_seed(args.seed) * 1_000_003 + step)
        return vppo.random_token_mask(mask, args.vppo_top_frac, generator)
    if args.ablation == "vppo-entropy-mask":
        return vppo.token_gradient_mask(scores["entropy"], mask, args.vppo_top_frac)
    if args.ablation == "vppo-tas-only":
        return mask.clone()
    return tgf


def vppo_advantage_scale(scores: dict, mask: torch.Tensor, args: Args) -> torch.Tensor:
    """VPPO's Trajectory Advantage Shaping (Sec. 3.3): alpha_i from completion i's mean S_t,
    min-max normalised over the whole batch, mean 1, at least beta_min and with no upper bound
    (as in the authors' code: one outlier completion can get ~14x; --vppo-max-scale caps it, a remedy
    that is not VPPO's and is off by default).  -> [B]
    Ablations that keep TGF alone (vppo-tgf-only, -random-mask, -entropy-mask): alpha = 1."""
    if args.ablation in ("vppo-tgf-only", "vppo-random-mask", "vppo-entropy-mask"):
        return torch.ones(mask.shape[0], device=mask.device)

    def tas(dependency, m):
        return vppo.trajectory_advantage_scale(dependency, m, args.vppo_min_scale, args.vppo_max_scale)

    return dist_.on_all_rows(tas, scores["dependency"], mask)


def entropy_top_weights(scores: dict, mask: torch.Tensor) -> torch.Tensor:
    """The high-entropy minority rule (arXiv 2506.01939): 1 on the top 20% of the batch's valid
    tokens by entropy, 0 elsewhere.  -> [B, L]"""
    return dist_.on_all_rows(vppo.entropy_top_mask, scores["entropy"], mask)


def pepo_stats(w: torch.Tensor, mask: torch.Tensor, lam: float) -> dict:
    """Logged: quantiles of w_t over every rank's valid tokens, and lambda."""
    stats, valid = {}, dist_.gather_values(w[mask.bool()])
    if valid.numel():
        for q in (10, 50, 90):
            stats[f"pepo_w_p{q}"] = torch.quantile(valid, q / 100).item()
        stats["pepo_w_max"] = valid.max().item()
    return {**stats, "pepo_lambda": lam}


def vppo_stats(dep, keep, scale, mask, padding) -> dict:
    """Logged: mean S_t of the kept and dropped tokens, the kept fraction, and alpha over every rank's
    real rows (`padding` [B] flags rows that only keep the ranks in step)."""
    real = dist_.gather_values(scale if padding is None else scale[~padding])
    return dict(
        vppo_dep_kept=dist_.global_mean(dep, keep),
        vppo_dep_dropped=dist_.global_mean(dep, mask * (1 - keep)),
        vppo_kept_frac=dist_.global_mean(keep, mask),
        tas_min=real.min().item(),
        tas_mean=real.mean().item(),
        tas_max=real.max().item(),
    )


def shape(
    scores: dict,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    truncated: torch.Tensor,
    step: int,
    args: Args,
    padding=None,
):
    """Step 3: advantages and token weights, where the methods differ. -> (advantages [B], token
    weights [B, L], loss mask [B, L], signals, stats). GRPO/DAPO: A_i and weight 1 on every valid token;
    each method multiplies in its own step. (Dynamic sampling lives in collect_rollouts, the loss
    aggregation and VPPO's entropy term in update; the entropy term is not weighted by TGF.)
    `signals` holds PEPO's w_t and VPPO's TGF mask whenever their inputs were scored, used or not.
    `padding` [B] flags rows that only keep the ranks in step (collect_rollouts)."""
    mask = mask.clone()
    if args.overlong_filter:  # DAPO: a completion cut by the length limit teaches nothing reliable
        mask[truncated] = 0
    advantages = grpo_advantages(rewards, args.group_size, scale=args.adv_scale).to(mask.device)  # A_i (GRPO Eq. 3)
    weights = torch.ones_like(mask)
    stats = {"entropy": dist_.global_mean(scores["entropy"], mask)}  # over all ranks' tokens
    signals = {"pepo_weight": None, "vppo_mask": None}  # computed whenever scored, used or not (--visualize)
    if scores["prior"] is not None:
        signals["pepo_weight"] = pepo_weights(scores, mask, args)
    if scores["dependency"] is not None:  # TGF: the top 40% of each completion's tokens by S_t
        signals["vppo_mask"] = vppo.token_gradient_mask(scores["dependency"], mask, args.vppo_top_frac)
    if args.pepo:  # PEPO: w_t blended in, A_{i,t} = ((1 - lambda) + lambda w_t) A_i
        blend, lam = pepo_blend(signals["pepo_weight"], step, args)
        weights = weights * blend
        stats.update(pepo_stats(signals["pepo_weight"], mask, lam))
    if args.vppo:  # VPPO: TGF keeps a completion's most image-dependent tokens, TAS rescales its A_i
        keep = vppo_token_filter(signals["vppo_mask"], scores, mask, step, args)
        scale = vppo_advantage_scale(scores, mask, args)
        weights, advantages = weights * keep, advantages * scale
        stats.update(vppo_stats(scores["dependency"], keep, scale, mask, padding))
    if args.token_rule == "entropy_top":  # high-entropy minority: top 20% of the batch's tokens
        weights = weights * entropy_top_weights(scores, mask)
    return advantages, weights, mask, signals, stats


def mini_batch_rows(rows: int, args: Args) -> list[slice]:
    """--mini-batches slices of whole groups (fewer when dynamic sampling left fewer groups)."""
    groups = rows // args.group_size
    n = max(1, min(args.mini_batches, groups))
    cuts = [args.group_size * (groups * k // n) for k in range(n + 1)]
    return [slice(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


def micro_batch_rows(rows: slice, size: int) -> list[slice]:
    """Slices of at most `size` rows (0: all of them) that cover `rows`, as micro_batches cuts them."""
    size = size or rows.stop - rows.start
    return [slice(i, min(i + size, rows.stop)) for i in range(rows.start, rows.stop, size)]


def new_logprobs(model, mb: dict, args: Args, autocast, logits=None) -> torch.Tensor:
    """log pi_theta(o_t) of a micro-batch, with gradient.  -> [b, L]
    `logits` with their graph (score(keep_graph=True)) stand in for the forward pass."""
    if logits is None:
        with autocast:
            logits, _ = forward(model, mb, args.temperature)
    return token_logprobs(logits, mb["completion_ids"])


def optimizer_step(model, optimizer, finite: bool, args: Args, step: int) -> tuple[float, bool]:
    """Clip the gradient norm (FSDP2: over all shards) and step, unless the loss or the norm is
    non-finite on any rank: a nan/inf update would ruin the weights and Adam's moments for good,
    so it is dropped (every rank steps, or none). -> (the norm before clipping, stepped)"""
    finite = dist_.all_true(finite)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if finite and torch.isfinite(grad_norm):
        optimizer.step()
        return grad_norm.item(), True
    optimizer.zero_grad(set_to_none=True)
    print(f"warning: step {step}: non-finite loss or gradient norm, optimizer step skipped", file=sys.stderr)
    return grad_norm.item(), False


def update(
    model,
    optimizer,
    inputs: dict,
    old_logp,
    ref_logp,
    advantages,
    weights,
    mask,
    args: Args,
    step: int,
    autocast,
    logits=None,
) -> dict:
    """Step 4: the clipped surrogate (policy_loss), --ppo-epochs passes over the rollout batch, each
    split into --mini-batches optimizer steps of whole groups, each micro-batched with exact loss
    scaling (loss_share: the micro-batch's share of the mini-batch's rows or tokens over all ranks;
    FSDP2 sums the gradients over ranks). Logged: the last pass, averaged over its optimizer steps.

    On-policy (one pass, one mini-batch: every default) old_logp equals the new log-probs, so
    every ratio is 1 (exactly when the scoring pass is reused) and the clip range, clip-higher and
    dual clip change nothing: they act with --ppo-epochs or --mini-batches > 1, as in VPPO's
    recipe. VPPO's entropy term, c mean(-log p) over the mini-batch's valid tokens, reaches every
    token (TGF's weights do not apply to it) and has zero expected gradient on-policy unless
    top-k/top-p change what is sampled.
    `logits` with their graph (score(keep_graph=True), one pass in one micro-batch) replace the forward.
    """
    model.train()
    minis, skipped = mini_batch_rows(mask.shape[0], args), 0
    for _ in range(args.ppo_epochs):
        stats, norms = [], []  # each pass's: the last one is logged
        for mini in minis:
            optimizer.zero_grad(set_to_none=True)
            rows = dist_.all_sum(dist_.real_rows(slice_batch(inputs, mini)))  # all ranks' rows, padding left out
            tokens = dist_.all_sum(mask[mini].sum())
            finite = True
            for sl in micro_batch_rows(mini, args.micro_batch_size):
                logp = new_logprobs(model, slice_batch(inputs, sl), args, autocast, logits)
                logits = None  # the scoring pass's logits serve the one micro-batch once
                loss, s = policy_loss(
                    logp,
                    old_logp[sl],
                    advantages[sl],
                    mask[sl],
                    args.loss_type,
                    args.clip_low,
                    args.clip_high,
                    token_weights=weights[sl],
                    ref_logp=None if ref_logp is None else ref_logp[sl],
                    beta=args.beta,
                    clip_dual=args.clip_dual,
                    max_len=args.max_new_tokens,
                )
                share = loss_share(args.loss_type, mask[sl], rows, tokens)
                loss = loss * share
                if args.entropy_penalty:  # VPPO: + c * mean(-log p) over the mini-batch's valid tokens
                    loss = loss + args.entropy_penalty * (-(logp * mask[sl]).sum() / tokens.clamp(min=1))
                loss.backward()
                finite = finite and bool(torch.isfinite(loss))
                stats.append((share, s))
            norm, stepped = optimizer_step(model, optimizer, finite, args, step)
            norms.append(norm)
            skipped += not stepped
    n = len(minis)  # shares are global: sum them over the ranks
    out = {key: dist_.all_sum(sum(share * s[key] for share, s in stats)) / n for key in stats[0][1]}
    return {**out, "grad_norm": sum(norms) / n, "nonfinite_skipped": skipped}


# ========================================================================================
# §6 The training loop: one loop for every algorithm
# ========================================================================================
def train(
    args: Args,
    model,
    ref_model,
    optimizer,
    vl: VLHelper,
    task,
    eval_examples,
    first_step: int,
    train_rng: random.Random,
    perturb_gen: torch.Generator,
    device,
    autocast,
    metrics,
    save,
    stop,
    record,
) -> tuple[int, float | None]:
    """Steps first_step..args.steps: rollouts -> score -> shape -> update, one line of `metrics`
    per step. `save(step)` writes a resumable checkpoint; `stop.name` is set by SIGINT/SIGTERM;
    `record(step, batch, scores, signals, advantages, weights)` keeps --visualize's rollouts.
    Returns the last step done and its held-out accuracy (None if not evaluated at that step)."""
    from tqdm import tqdm

    step, shown, held_out = first_step - 1, False, None
    bar = tqdm(
        range(first_step, args.steps + 1),
        initial=step,
        total=args.steps,
        desc=args.algo,
        dynamic_ncols=True,
        disable=not dist_.is_main(),
    )
    for step in bar:
        t0 = time.time()
        for group in optimizer.param_groups:  # a pure function of the step, so resuming needs only the step
            group["lr"] = learning_rate(step, args.steps, args.lr, args.lr_schedule)
        # 1. Rollouts: G samples per prompt from the current (= old) policy, scored by the task.
        batch, seen, dropped = collect_rollouts(model, vl, task, train_rng, args, device, autocast)
        m = {"step": step, **{k: v.mean().item() for k, v in seen.items()}, "groups_dropped": dropped}
        if batch is None:
            m["skipped"] = 1  # dynamic sampling found no group with signal
        else:
            t1 = time.time()
            show = args.visualize > 0 and (not shown or step == args.steps)  # --visualize: first and last step
            # the prior and the dependency are also computed to be shown when the algorithm does not use them
            want_prior, want_dep = args.pepo or show, args.vppo or show
            inputs = {k: batch[k] for k in (*MODEL_KEYS, "completion_ids", "padding")}
            if want_dep:  # VPPO: the same images with random patches blacked out
                inputs["pixel_values_perturbed"] = vppo.perturbed_pixel_values(
                    batch, vl.ip, args.vppo_perturb, perturb_gen, fit=vl.fit
                )
            inputs = to_device(inputs, device)
            parts = micro_batches(inputs, args.micro_batch_size)
            # on-policy in one pass, the update reuses the scoring pass's graph (not under FSDP2)
            reuse = args.ppo_epochs == args.mini_batches == len(parts) == 1 == dist_.world()
            # 2. Score: old log-probs, entropy, PEPO prior, reference, VPPO dependency (no gradient).
            with autocast:
                scores = score(model, ref_model, parts, args, prior=want_prior, dependency=want_dep, keep_graph=reuse)
            # 3. Shape: advantages, token weights and masks: the only step where the algorithms differ.
            mask = batch["completion_mask"].to(device)
            advantages, weights, mask, signals, stats = shape(
                scores, batch["rewards"], mask, batch["truncated"], step, args, batch["padding"]
            )
            t2 = time.time()
            # 4. Update: clipped surrogate (+ KL, + entropy term), micro-batched, --ppo-epochs times.
            stats.update(
                update(
                    model,
                    optimizer,
                    inputs,
                    scores["old_logp"],
                    scores["ref_logp"],
                    advantages,
                    weights,
                    mask,
                    args,
                    step,
                    autocast,
                    logits=scores.pop("logits"),
                )
            )
            # times of the slowest rank
            m.update(stats, time_scoring=dist_.all_max(t2 - t1), time_update=dist_.all_max(time.time() - t2))
            if show:
                shown = True
                record(step, batch, scores, signals, advantages, weights)
        m["seconds"] = dist_.all_max(time.time() - t0)
        held_out = None
        if args.eval_every and step % args.eval_every == 0:  # held-out curve (bench.py learn); not in `seconds`
            m["eval_accuracy"] = held_out = evaluate(model, vl, task, eval_examples, args, device, autocast)["accuracy"]
        m["grade_failures"] = dist_.all_sum(tasks.GRADER.pop_failures())  # --data: grading calls that hung or failed
        m = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}  # nan -> null
        metrics.write(json.dumps(m) + "\n")
        metrics.flush()
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}")
        stopping = dist_.any_true(stop.name)  # a signal that reached one rank stops all of them
        if step < args.steps and (stopping or (args.save_every and step % args.save_every == 0)):
            save(step)
        if stopping:
            break
    return step, held_out


# ========================================================================================
# §7 Run management: argument and model-source checks, the tiny-model builder,
# checkpoints and resume, signals, main. Not needed to follow the algorithms.
# ========================================================================================
def check_args(args: Args) -> None:
    """Refuse settings that would crash later or silently train nothing, before anything is loaded."""
    if args.recipe not in (None, "list") and args.data is None:
        raise UsageError(f"--recipe {args.recipe} trains on a dataset: pass --data FILE.jsonl (see README, Real data)")
    if args.data is None and args.task not in (*tasks.TASKS, "list") and not args.task.endswith(".jsonl"):
        raise UsageError(
            f"unknown --task {args.task!r}; choose from {', '.join(tasks.TASKS)}, "
            "or train on a dataset with --data FILE.jsonl"
        )
    if args.reward not in tasks.REWARDS:
        raise UsageError(f"unknown --reward {args.reward!r}; choose from {', '.join(tasks.REWARDS)}")
    if args.data is None and (args.reward != "jsonl" or args.format_prompt is not None):
        flag = "--reward" if args.reward != "jsonl" else "--format-prompt"
        raise UsageError(f"{flag} applies to --data FILE.jsonl; a toy task has its own prompts and verifier")
    if (args.data is not None or args.task.endswith(".jsonl")) and tasks.mathruler_missing():
        raise UsageError(
            f"--reward {args.reward} grades with mathruler, but {tasks.mathruler_missing()} is not installed; "
            "pip install mathruler sympy pylatexenc"
        )
    rules = [
        (
            args.min_pixels is None or args.max_pixels is None or args.min_pixels <= args.max_pixels,
            f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}",
        ),
        (
            all(n is None or n >= 1 for n in (args.min_pixels, args.max_pixels)),
            "--min-pixels / --max-pixels: use at least 1",
        ),
        (
            not args.ablation.startswith("pepo-") or args.pepo,
            f"--ablation {args.ablation} changes PEPO; use it with --algo pepo_g or pepo_d",
        ),
        (
            not args.ablation.startswith("vppo-") or args.vppo,
            f"--ablation {args.ablation} changes VPPO; use it with --algo vppo",
        ),
        (
            args.group_size >= 2,
            f"--group-size {args.group_size}: advantages compare completions of one prompt, so use at least 2",
        ),
        (args.steps >= 1, f"--steps {args.steps}: use at least 1"),
        (args.prompts_per_step >= 1, f"--prompts-per-step {args.prompts_per_step}: use at least 1"),
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: use at least 1"),
        (args.temperature > 0, f"--temperature {args.temperature}: logits are divided by it, use a value > 0"),
        (args.ppo_epochs >= 1, f"--ppo-epochs {args.ppo_epochs}: use at least 1"),
        (
            1 <= args.mini_batches <= args.prompts_per_step,
            f"--mini-batches {args.mini_batches}: use 1 up to --prompts-per-step ({args.prompts_per_step}); "
            "each holds whole groups",
        ),
        (args.clip_dual == 0 or args.clip_dual > 1, f"--clip-dual {args.clip_dual}: use 0 (off) or a value > 1"),
        (args.top_k >= 0, f"--top-k {args.top_k}: use 0 (off) or more"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: use a value in (0, 1]"),
        (0 <= args.adam_beta2 < 1, f"--adam-beta2 {args.adam_beta2}: use a value in [0, 1)"),
        (args.micro_batch_size >= 0, f"--micro-batch-size {args.micro_batch_size}: use 0 (whole batch) or more"),
        (args.max_sampling_tries >= 1, f"--max-sampling-tries {args.max_sampling_tries}: use at least 1"),
        (args.eval_size >= 1, f"--eval-size {args.eval_size}: use at least 1"),
        (args.eval_samples >= 0, f"--eval-samples {args.eval_samples}: use 0 (off) or more"),
        (args.save_every >= 0, f"--save-every {args.save_every}: use 0 (off) or more"),
        (0 <= args.vppo_top_frac <= 1, f"--vppo-top-frac {args.vppo_top_frac}: use a fraction in [0, 1]"),
        (
            args.vppo_max_scale == 0 or args.vppo_max_scale >= 1,
            f"--vppo-max-scale {args.vppo_max_scale}: use 0 (unbounded) or a cap >= 1",
        ),
        (
            0 <= args.length_penalty_cache < args.max_new_tokens,
            f"--length-penalty-cache {args.length_penalty_cache}: use 0 (off) up to --max-new-tokens - 1",
        ),
        (args.lora_rank >= 0, f"--lora-rank {args.lora_rank}: use 0 (off, full fine-tune) or a rank of 1 or more"),
        (
            args.lora_rank > 0
            or (
                args.lora_alpha is None
                and args.lora_dropout == 0
                and args.lora_targets == LORA_TARGETS
                and not args.lora_vision
            ),
            "--lora-alpha, --lora-dropout, --lora-targets and --lora-vision shape LoRA adapters: add --lora-rank R",
        ),
        (args.lora_alpha is None or args.lora_alpha > 0, f"--lora-alpha {args.lora_alpha}: use a value > 0"),
        (0 <= args.lora_dropout < 1, f"--lora-dropout {args.lora_dropout}: use a value in [0, 1)"),
        (
            re.fullmatch(r"\w+(,\w+)*", args.lora_targets) is not None,
            f"--lora-targets {args.lora_targets!r}: use comma-separated layer names such as {LORA_TARGETS}",
        ),
        (
            not (args.lora_vision and args.freeze_vision),
            "--lora-vision adapts the vision tower, --freeze-vision freezes it: leave one out",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    if args.lora_rank:
        require_peft("--lora-rank")


def require_peft(what: str) -> None:
    """peft is needed only for LoRA: without it, one line naming the install command."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise UsageError(f"{what} needs peft (LoRA adapters), which is not installed: pip install peft")


HUB_ID = re.compile(r"^[\w-][\w.-]*/[\w.-]+$")  # "Qwen/Qwen2.5-VL-3B-Instruct"


def check_model_source(name: str) -> bool:
    """Fail fast on a --model that cannot be found. Returns True when a hub id has to come from
    the local cache because the hub cannot be reached (then loading skips the network)."""
    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file():  # a LoRA run's checkpoint: adapters on the base recorded in it
        require_peft(f"--model {name}, a LoRA checkpoint,")
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not (Path(base).is_dir() or HUB_ID.match(base)):
            raise UsageError(
                f"--model {name}: the base model recorded in its adapter_config.json ({base}) is missing; "
                "restore it there, or set base_model_name_or_path to a copy of it"
            )
        return check_model_source(base)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--model {name}: no config.json in it; pass a folder written by save_pretrained "
                "(a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint), a hub id or 'tiny'"
            )
        return False
    if not HUB_ID.match(name):
        raise UsageError(
            f"--model {name}: no such folder; pass a save_pretrained folder, a hub id such as "
            "Qwen/Qwen2.5-VL-3B-Instruct, or 'tiny'"
        )
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    offline = constants.HF_HUB_OFFLINE
    if not offline:
        try:  # one quick probe: without network from_pretrained retries for about a minute
            get_session().head(constants.ENDPOINT, timeout=5)
        except Exception:
            offline = True
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise UsageError(
            f"--model {name}: not a local folder and not in the download cache, and {why}; "
            f"download it where there is network (hf download {name}) or pass a local folder"
        )
    return offline


def lora_config(model, args: Args):
    """peft LoraConfig of the --lora-* flags: adapters on the language model's linear layers named in
    --lora-targets and, with --lora-vision, on every linear layer of the vision tower and its merger.
    target_modules is one regex of the chosen layers' names with the layer index as \\d+: bare names
    would also match the vision tower's gate_proj/up_proj/down_proj. A name the model lacks: UsageError."""
    from peft import LoraConfig

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    text = [n for n in linear if ".language_model." in n]
    have, wanted = sorted({n.rsplit(".", 1)[1] for n in text}), args.lora_targets.split(",")
    missing = [t for t in wanted if t not in have]
    if missing:
        raise UsageError(
            f"--lora-targets: the language model has no linear layer named {', '.join(missing)}; "
            f"it has {', '.join(have)}"
        )
    chosen = [n for n in text if n.rsplit(".", 1)[1] in wanted]
    chosen += [n for n in linear if ".visual." in n] if args.lora_vision else []
    patterns = sorted({re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(n)) for n in chosen})
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or 2 * args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules="|".join(patterns),
        bias="none",
    )


def add_lora(model, args: Args, base: str, adapter: str | None = None):
    """--lora-rank: LoRA adapters (peft) on `model`: new ones, or a run's saved ones to resume (`adapter`).
    Every other weight is frozen and, with --bf16, held in bf16 (never trained, it needs no fp32 master
    copy); the adapters and so their optimizer state stay fp32. `base` (the model the run started from)
    is recorded in the saved adapter_config.json, so a checkpoint/ loads with --model (load_policy).
    Returns the PeftModel, whose disable_adapter() is the KL reference (reference_policy); `model`, which
    training keeps using as it is, now holds the adapter layers."""
    from peft import PeftModel, get_peft_model

    config = lora_config(model, args)  # checks the target names, also when resuming
    with peft_quietly():
        if adapter:
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    if args.bf16:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return peft_model


def check_saved_adapter(ckpt: Path, args: Args) -> None:
    """--resume of a LoRA run: its saved adapter_config.json must agree with the run's settings."""
    path = ckpt / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: a LoRA run (--lora-rank {args.lora_rank}) but {path} is missing")
    saved = json.loads(path.read_text())
    want = {"r": args.lora_rank, "lora_alpha": args.lora_alpha or 2 * args.lora_rank, "lora_dropout": args.lora_dropout}
    for key, value in want.items():
        if saved.get(key) != value:
            raise UsageError(
                f"--resume {args.resume}: its adapter_config.json has {key} {saved.get(key)}, the run's settings "
                f"give {value}; start a new run"
            )


TRAINER_JSON, TRAINER_PT = "trainer.json", "trainer_state.pt"  # checkpoint/ = save_pretrained files + these two


def save_atomic(path: str, *objects, state: dict | None = None) -> None:
    """save_pretrained every object (and a training `state`, see save_training_state) into a
    temporary folder, then swap it in by renames, so a crash never leaves a half-written
    checkpoint at `path`: until the new one is complete the old one stays, as `path` or, for
    the instant between the two renames, as `path`.old (find_checkpoint looks there too)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    if state is not None:
        torch.save({k: state[k] for k in ("optimizer", "rng")}, tmp / TRAINER_PT)
        small = {k: v for k, v in state.items() if k not in ("optimizer", "rng")}
        (tmp / TRAINER_JSON).write_text(json.dumps(small, indent=1))  # last: marks the folder complete
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# Qwen's special tokens, given to the tiny model's tokenizer
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


# Qwen2-VL's and Qwen2.5-VL's chat template (the hub checkpoints' chat_template.json), given to the
# tiny model so that its prompts take the same path as a real checkpoint's: the default system
# message when there is none, one <|vision_start|><|image_pad|><|vision_end|> per image part.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(path: str, task: tasks.Task, seed: int, warmup_steps: int | None = None) -> str:
    """Write a small random Qwen2.5-VL checkpoint to `path`, taught only the answer format.

    The tokenizer is a byte-level BPE trained on the toy tasks' text, holding Qwen's real
    special tokens and Qwen2.5-VL's chat template. The format warm-up trains on *random*
    labels (task.random_completion), so the saved policy answers in the right format but at
    chance accuracy. It runs task.warmup_steps steps (60; `color-think` takes 200 to also learn
    its text-only rule) unless `warmup_steps` is given. A task with a pretrain_task also trains
    on that other task's correct answers: perception pre-training, as a real VLM has had.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    warmup_steps = task.warmup_steps if warmup_steps is None else warmup_steps
    if (Path(path) / "config.json").exists() and (Path(path) / "chat_template.jinja").exists():
        return path  # (one built before the tiny model had a chat template is built again)
    torch.manual_seed(seed)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = tasks.tokenizer_corpus() + ["user\n", "assistant\n", "system\n"]
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<answer>", "</answer>", "<think>", "</think>"])  # one token per tag: short completions
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]),
            bos_token_id=None,
            eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            initializer_range=0.1,
        ),  # image features (std ~1.8) stand out from text embeddings (std 0.02)
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    model = AutoModelForImageTextToText.from_config(config)

    # Format warm-up: supervised on random labels, so it never sees a correct answer. Only the
    # language side trains: fitting random labels would wash the colour out of the vision
    # features (a linear probe on pooled image features drops from 0.99 to 0.91).
    rng = random.Random(seed + 17)
    vl = VLHelper(tokenizer, image_processor, config)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if ".visual." not in n], lr=2e-3)
    model.model.visual.requires_grad_(False)  # no backward through a tower that is not trained
    pretrain = task.pretrain_task and tasks.get_task(task.pretrain_task)
    for _ in range(warmup_steps):
        examples = [task.sample(rng) for _ in range(32)]
        texts = [task.random_completion(rng) for _ in examples]
        if pretrain:  # perception pre-training: another task's correct answers, never this task's
            more = [pretrain.sample(rng) for _ in range(32)]
            examples, texts = examples + more, texts + [pretrain.correct_completion(ex) for ex in more]
        targets = [tokenizer(t + "<|im_end|>").input_ids for t in texts]
        batch = vl.with_completions(vl.encode_prompts(examples), targets)
        logits, _ = forward(model, batch)
        loss = -masked_average(token_logprobs(logits, batch["completion_ids"]), batch["completion_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.model.visual.requires_grad_(True)
    save_atomic(path, model, tokenizer, image_processor)
    return path


def rng_states(train_rng: random.Random, perturb_gen: torch.Generator) -> dict:
    """Every random stream the training loop draws from."""
    return {
        "python": random.getstate(),
        "task": train_rng.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "vppo": perturb_gen.get_state(),
    }


def set_rng_states(states: dict, train_rng: random.Random, perturb_gen: torch.Generator) -> None:
    random.setstate(states["python"])
    train_rng.setstate(states["task"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    perturb_gen.set_state(states["vppo"])


def save_training_state(
    path, model, tokenizer, image_processor, optimizer_state, step, args, rngs, metrics_bytes, before
) -> None:
    """Everything a resumed run needs to continue exactly: weights, tokenizer and image processor
    (save_pretrained), optimizer moments, step, RNG streams (a list: one entry per process), the
    length of metrics.jsonl up to this step and the accuracy before RL. The PEPO ramp and any
    step-based schedule follow from step and args.steps. Written atomically (save_atomic)."""
    state = {
        "step": step,
        "steps": args.steps,
        "pepo_lambda": pepo_ramp(step, args.steps),
        "metrics_bytes": metrics_bytes,
        "eval_before": before,
        "args": dataclasses.asdict(args),
        "world_size": len(rngs),
        "optimizer": optimizer_state,
        "rng": rngs,
    }
    save_atomic(path, model, tokenizer, image_processor, state=state)


def find_checkpoint(run_dir: str) -> Path:
    """The run's newest complete checkpoint folder: checkpoint/, or checkpoint.old/ when a save was
    cut off between its two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if (Path(run_dir) / name / TRAINER_JSON).is_file():
            return Path(run_dir) / name
    raise UsageError(
        f"--resume {run_dir}: no resumable checkpoint ({Path(run_dir) / 'checkpoint' / TRAINER_JSON} is missing); "
        "pass the --output-dir of a run that saved one (at the end, every --save-every steps, or on SIGINT/SIGTERM)"
    )


def load_training_state(run_dir: str) -> tuple[Path, dict]:
    """(checkpoint folder, state) of a run, for --resume."""
    path = find_checkpoint(run_dir)
    state = json.loads((path / TRAINER_JSON).read_text())
    state.update(
        torch.load(path / TRAINER_PT, weights_only=True, mmap=True)
    )  # mmap: only what is read comes into memory
    return path, state


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal only asks the loop to stop after the current step
    (it then saves a checkpoint); a second one interrupts at once. main() restores the handlers."""

    def __init__(self):
        self.name = None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(
            f"\n{self.name}: finishing this step, then saving a checkpoint (send it again to stop at once)",
            file=sys.stderr,
        )


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see python pepo.py --help)")


def build_parser(given_only: bool = False) -> ArgumentParser:
    """One --flag per Args field; booleans get --x / --no-x, and None keeps the preset's value.
    given_only: no defaults, so parsing returns just the flags on the command line."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in ("bool", bool):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS if given_only else f.default,
                help=meta["help"],
            )
        else:
            typ = meta.get("type") or {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(
                flag,
                type=typ,
                default=argparse.SUPPRESS if given_only else f.default,
                help=meta["help"],
                choices=meta.get("choices"),
            )
    return p


def parse_args(argv=None) -> Args:
    """Flags -> Args with the preset filled in and checked. With --resume DIR the saved run's
    settings come back: the command that started the run, plus --resume DIR, continues it. A
    flag may repeat its saved value; only --device may change."""
    p = build_parser()
    args = Args(**vars(p.parse_args(argv)))
    if args.resume:
        saved = json.loads((find_checkpoint(args.resume) / TRAINER_JSON).read_text())["args"]
        given = vars(build_parser(given_only=True).parse_args(argv))
        for key, value in given.items():
            if key in ("resume", "device") or (key == "output_dir" and Path(value) == Path(args.resume)):
                continue
            if key not in saved or value != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"--resume {args.resume}: {flag} {value} differs from the saved run's {saved.get(key)!r}; "
                    f"leave {flag} out, or start a new run"
                )
        names = {f.name for f in dataclasses.fields(Args)}
        args = Args(
            **{
                **{k: v for k, v in saved.items() if k in names},
                "resume": args.resume,
                "device": args.device,
                "output_dir": args.resume,
            }
        )
    elif args.recipe and args.recipe != "list":
        apply_recipe(args, vars(build_parser(given_only=True).parse_args(argv)))
    apply_budget(args)
    apply_preset(args)
    check_args(args)
    if args.resume and args.lora_rank:
        check_saved_adapter(find_checkpoint(args.resume), args)
    return args


def recipe_table() -> str:
    """`--recipe list`: the resolved settings of every recipe as a markdown table (the README's), then the gaps."""
    runs = {name: apply_preset(apply_recipe(Args(recipe=name), {})) for name in RECIPES}

    def off(x, unit=""):
        return "off" if not x else f"{x:g}{unit}"

    rows = {
        "model": lambda a: a.model.split("/")[-1],
        "algorithm; reward; format prompt": lambda a: f"{a.algo}; {a.reward}; {a.format_prompt or 'in the rows'}",
        "steps × prompts × G; completion budget": lambda a: (
            f"{a.steps} × {a.prompts_per_step} × {a.group_size}; {a.max_new_tokens}"
        ),
        "optimizer steps per batch; micro-batch": lambda a: f"{a.mini_batches * a.ppo_epochs}; {a.micro_batch_size}",
        "temperature; top-k; top-p": lambda a: f"{a.temperature:g}; {off(a.top_k)}; {a.top_p:g}",
        "lr, schedule; weight decay; β2": lambda a: f"{a.lr:g}, {a.lr_schedule}; {a.weight_decay:g}; {a.adam_beta2:g}",
        "KL β; clip low/high; dual clip; loss": lambda a: (
            f"{off(a.beta)}; {a.clip_low:g}/{a.clip_high:g}; {off(a.clip_dual)}; "
            + {"grpo": "sequence mean", "dapo": "token mean", "dr_grpo": "Dr. GRPO"}[a.loss_type]
        ),
        "dynamic sampling; overlong filter": lambda a: (
            (f"≤ {a.max_sampling_tries} rounds" if a.dynamic_sampling else "off")
            + ("; on" if a.overlong_filter else "; off")
        ),
        "method knobs": lambda a: (
            (f"PEPO α {a.pepo_alpha:g}, τ {a.pepo_temperature:g}" if a.pepo else "")
            + (f"TGF top {a.vppo_top_frac:g}, β_min {a.vppo_min_scale:g}, " if a.vppo else "")
            + (f"entropy {a.entropy_penalty:g}, {a.vppo_perturb}" if a.vppo else "")
        ),
        "image pixels before the processor": lambda a: (
            f"{a.min_pixels:,}–{a.max_pixels:,}" if a.min_pixels or a.max_pixels else "the processor's range"
        ),
        "vision tower; bf16; checkpointing": lambda a: (
            f"{'frozen' if a.freeze_vision else 'trained'}; {'on' if a.bf16 else 'off'}; "
            f"{'on' if a.gradient_checkpointing else 'off'}"
        ),
    }
    lines = ["| setting | " + " | ".join(f"`{n}`" for n in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f(a) for a in runs.values()) + " |" for k, f in rows.items()]
    return "\n".join(lines + ["", "Not matched here: " + "; ".join(RECIPE_GAPS) + "."])


def token_records(vl, batch: dict, scores: dict, signals: dict, advantages, weights, step: int, n: int) -> list[dict]:
    """--visualize: plain-JSON records of the first n rollouts: tokens, every per-token signal,
    reward, advantage and the images (base64 PNG). `python bench.py heatmap RUN` renders them."""
    import base64
    import io

    per_token = {
        "prior": scores["prior"],
        "entropy": scores["entropy"],
        "pepo_weight": signals["pepo_weight"],
        "dependency": scores["dependency"],
        "vppo_mask": signals["vppo_mask"],
        "weight": weights,
    }
    rows = []
    for i in range(min(n, batch["completion_ids"].shape[0])):
        valid = batch["completion_mask"][i].bool()  # every generated token, also those a filter masked out
        images = []
        for im in batch["examples"][i].images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            images.append(base64.b64encode(buf.getvalue()).decode())
        rows.append(
            {
                "step": step,
                "row": i,
                "tokens": [vl.tok.decode([t]) for t in batch["completion_ids"][i][valid].tolist()],
                "signals": {k: v[i].cpu()[valid].tolist() for k, v in per_token.items() if v is not None},
                "reward": float(batch["rewards"][i]),
                "accuracy": float(batch["accuracy"][i]),
                "advantage": float(advantages[i]),
                "answer": batch["examples"][i].answer,
                "prompt": vl.chat_text(batch["examples"][i].prompt),  # as the template renders it
                "images": images,
            }
        )
    return rows


def run(args: Args):
    """Build or load everything, evaluate, train (§6), evaluate again, write summary.json."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the console to our own tqdm bar
    if args.task == "list":
        for t in tasks.TASKS.values():
            print(f"{t.name:12s} {t.description}")
        return
    if args.recipe == "list":
        print(recipe_table())
        return
    task = (  # a dataset's rows are all checked here
        tasks.JsonlTask(args.data, args.image_root, args.reward, args.format_prompt)
        if args.data
        else tasks.get_task(args.task)
    )
    out_dir = Path(args.output_dir)
    offline = args.model != "tiny" and check_model_source(args.model)
    device = dist_.init(args.device)  # under torchrun: join the process group, this rank's GPU
    if not dist_.is_main():
        sys.stdout = open(os.devnull, "w")  # one console: rank 0 prints (the numbers are global)
    ckpt, state = load_training_state(args.resume) if args.resume else (None, None)
    if state and state.get("world_size", 1) != dist_.world():  # each process continues its own random streams
        raise UsageError(
            f"--resume {args.resume}: the run was saved by {state.get('world_size', 1)} process(es), this is "
            f"{dist_.world()}; resume it with the same number (torchrun --nproc-per-node N, or plain python for 1)"
        )
    metrics_path = out_dir / "metrics.jsonl"
    if state and (not metrics_path.is_file() or metrics_path.stat().st_size < state["metrics_bytes"]):
        raise UsageError(
            f"--resume {args.resume}: metrics.jsonl is missing or shorter than at the checkpoint "
            f"(step {state['step']}); "
            "restore it, or start a new run"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    # Seeding: python (task stream), torch (init, sampling); reseeded right before step 1.
    # Under torchrun each rank has its own streams (rank_seed): different prompts and completions.
    seed = dist_.rank_seed(args.seed)
    random.seed(seed)
    torch.manual_seed(seed)
    train_rng = random.Random(seed)
    perturb_gen = torch.Generator().manual_seed(seed)  # VPPO's patch masks
    eval_examples = [task.sample(random.Random(10_000 + i)) for i in range(args.eval_size)]  # fixed held-out set

    if args.bf16 is None:  # bf16 where it pays (CUDA); fp32 on CPU keeps the toy runs exact
        args.bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    t_start = time.time()
    model_path = str(out_dir / "tiny_init") if args.model == "tiny" else args.model
    if args.model == "tiny" and dist_.is_main():  # one writer
        build_tiny_model(model_path, task, args.seed)
    dist_.barrier()  # the other ranks read the tiny model once rank 0 wrote it
    # A resumed run loads its checkpoint's weights; with LoRA, the initial base and (add_lora) its saved adapters.
    model, tokenizer, image_processor = load_policy(str(ckpt) if state and not args.lora_rank else model_path, offline)
    need = tasks.answer_budget(task, tokenizer)
    if args.max_new_tokens < need:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} is too small for task {task.name}: its longest well-formatted "
            f"answer takes {need} tokens with the end token; use --max-new-tokens {need} or more"
        )
    peft_model = None
    if args.lora_rank:  # the base frozen (bf16 with --bf16), adapters trained in fp32
        base = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
        peft_model = add_lora(model, args, base, str(ckpt) if state else None)
    model.to(device)
    pixel_range = (args.min_pixels or 1, args.max_pixels or math.inf) if args.min_pixels or args.max_pixels else None
    vl = VLHelper(tokenizer, image_processor, model.config, args.system, pixel_range)
    if args.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if args.beta > 0 and not args.eval_only and peft_model is not None:
        ref_model = peft_model  # the policy with its adapters switched off (reference_policy)
    elif (
        args.beta > 0 and not args.eval_only
    ):  # the frozen initial policy; a resumed run loads it again from the initial weights
        ref_model = (
            (load_policy(model_path, offline)[0].to(device) if state else copy.deepcopy(model))
            .eval()
            .requires_grad_(False)
        )
        if args.bf16:  # never trained, so it needs no fp32 master weights: half the memory (7.5 GB for a 3B model)
            ref_model.to(torch.bfloat16)
        ref_model = dist_.shard(ref_model)  # under torchrun: each rank holds a shard of it
    model = dist_.shard(model)  # FSDP2 under torchrun: parameters, gradients and (below) optimizer states sharded
    before = (
        state["eval_before"]
        if state
        else evaluate(model, vl, task, eval_examples, args, device, autocast, samples=args.eval_samples)
    )
    if args.eval_only:
        result = {"model": args.model, "task": task.name, "examples": len(eval_examples), **before}
        if dist_.is_main():
            (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return result
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, args.adam_beta2),
    )
    if state:
        dist_.load_optimizer_state(
            model, optimizer, state["optimizer"]
        )  # under torchrun: rank 0's full state, each rank keeps its shard
    if dist_.is_main() and state:
        os.truncate(metrics_path, state["metrics_bytes"])  # lines after the checkpoint's step are done again
    elif dist_.is_main():
        (out_dir / "tokens.jsonl").unlink(missing_ok=True)  # --visualize appends; a new run starts it afresh
    print(f"accuracy before RL: {before['accuracy']:.3f}")

    def save(
        step,
    ):  # the resumable checkpoint/ of this step; under torchrun every rank hands in its shards, rank 0 writes
        weights = dist_.saveable(peft_model or model, trainable_only=peft_model is not None)  # gathered on rank 0
        optimizer_state = dist_.optimizer_state(model, optimizer)
        rngs = dist_.gather_objects(rng_states(train_rng, perturb_gen))  # every rank's random streams
        if dist_.is_main():
            save_training_state(
                out_dir / "checkpoint",
                weights,
                tokenizer,
                image_processor,
                optimizer_state,
                step,
                args,
                rngs,
                metrics_path.stat().st_size,
                before,
            )
        dist_.barrier()  # no rank goes on (or exits) before the checkpoint is complete

    # The training streams start here, after building, loading and evaluating (which therefore never
    # shift them); a resumed run continues them from the checkpoint.
    random.seed(seed)
    torch.manual_seed(seed)
    if state:
        set_rng_states(state["rng"][dist_.rank()], train_rng, perturb_gen)

    def record(step, *rollouts):  # --visualize: rank 0's first rollouts with every per-token signal, as data
        with open(out_dir / "tokens.jsonl" if dist_.is_main() else os.devnull, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in token_records(vl, *rollouts, step, args.visualize))

    tasks.GRADER.pop_failures()  # those of the evaluation before RL are in eval_before; each step counts its own
    stop = StopRequest()  # SIGINT/SIGTERM: finish the step, save, stop
    with open(metrics_path if dist_.is_main() else os.devnull, "a" if state else "w") as metrics:  # rank 0 logs
        step, held_out = train(
            args,
            model,
            ref_model,
            optimizer,
            vl,
            task,
            eval_examples,
            (state["step"] if state else 0) + 1,
            train_rng,
            perturb_gen,
            device,
            autocast,
            metrics,
            save,
            stop,
            record,
        )
    if step < args.steps:  # stopped by a signal, after saving this step
        print(
            f"{stop.name or 'a signal to another rank'}: stopped after step {step} of {args.steps}; "
            f"checkpoint in {out_dir / 'checkpoint'}; "
            f"continue with: python pepo.py --resume {out_dir}",
            file=sys.stderr,
        )
        return {"stopped_at_step": step, "signal": stop.name}

    if held_out is not None and not args.eval_samples:  # the last step's evaluation is the same computation
        after = {"accuracy": held_out}
    else:
        after = evaluate(model, vl, task, eval_examples, args, device, autocast, samples=args.eval_samples)
    print(f"accuracy after RL: {after['accuracy']:.3f}")
    save(args.steps)
    summary = {
        "algo": args.algo,
        "task": task.name,
        "model": args.model,
        "steps": args.steps,
        "recipe": args.recipe,  # its resolved settings, with any flags given, are in "args"
        "seconds": round(time.time() - t_start, 1),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "eval_before": before,
        "eval_after": after,
        "args": dataclasses.asdict(args),
    }
    if dist_.is_main():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


def main(argv=None):
    """Command line entry. Bad input ends in one line `error: ...` on stderr and exit status 2."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(parse_args(argv))
    except (UsageError, tasks.DatasetError) as e:
        if dist_.is_main():  # under torchrun every rank fails alike: one line
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (
        KeyboardInterrupt
    ):  # a second Ctrl-C (or one before training starts): stop now, checkpoints stay as they were
        print("\ninterrupted; the last saved checkpoint, if any, is intact", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # run() catches SIGINT/SIGTERM to stop cleanly; give the caller its handlers back
        for s, h in handlers.items():
            signal.signal(s, h)
        dist_.close()  # under torchrun: leave the process group


if __name__ == "__main__":
    main()
