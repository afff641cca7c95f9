"""Multi-process training for pepo.py: `torchrun --nproc-per-node N pepo.py [flags]`.

One model is trained by N processes (ranks). FSDP2 (`fully_shard`) shards the parameters,
gradients and optimizer states over the ranks; each rank samples and scores its own part of
the rollout batch. The algorithms stay those of one process: everything that pepo.py defines
over the batch (DAPO's token count, Dr. GRPO's B x L, VPPO's TAS min/max/mean, the entropy-top
threshold, logged means) is computed over the *global* batch with the collectives below.

Without torchrun (WORLD_SIZE unset or 1) nothing is started and every function here is the
identity of the one-process code: all_sum(x) is x, on_all_rows(fn, x) is fn(x), shard(model)
is model. So the training loop is one code path for any number of processes.

Process group: NCCL for CUDA tensors and gloo for CPU tensors ("cpu:gloo,cuda:nccl") on GPUs,
gloo alone on CPU. The small collectives here (counts, metrics, [B, L] token scores) run on
whatever device their tensor is on.

Gradients: each rank's loss is its *share of the global loss* (local sum / global
denominator), and shard() makes FSDP sum the gradients over ranks instead of averaging them,
so the summed gradient is exactly the gradient of the one-process loss.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------
def init(device: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join the process group when started by torchrun, and return this process's device.

    device: pepo's --device ('auto', 'cpu', 'cuda'). Under torchrun with CUDA each rank takes
    cuda:LOCAL_RANK. Without torchrun: the same device choice as one-process pepo.py.
    """
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def close() -> None:
    """Leave the process group (end of training); a no-op in one process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index, 0 .. world() - 1."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that prints, logs and writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (e.g. rank 0 built the tiny model)."""
    if world() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """Seed of this rank's sampling streams: ranks must sample different prompts and completions.
    Rank 0 keeps `seed`, so a one-process run is unchanged."""
    return seed + 1_000_003 * rank()


# ----------------------------------------------------------------------------------------
# Sharding and checkpoints
# ----------------------------------------------------------------------------------------
def shard(model, mp_policy=None):
    """FSDP2 on a Qwen-VL model: one unit per text decoder layer and per vision block, the vision
    tower (patch embed, merger), then the root (embeddings, final norm, lm_head). Parameters become
    DTensors sharded over the ranks on dim 0; the optimizer built afterwards holds only its
    shard of the states. Returns the model (the same object, its class now FSDP<name>).

    Gradients are summed over ranks, not averaged (see the module docstring). pepo.generate
    keeps the ranks in step: a rank whose completions all ended keeps running forward passes
    until every rank is done, so the collectives match.
    One process: the model is returned untouched.
    """
    if world() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    # The vision tower is a unit of its own too: generate() in transformers 5 runs it directly
    # (model.get_image_features, outside the root's forward), where root-owned parameters
    # would still be sharded; as a unit, its own hooks gather them.
    units = [*model.model.language_model.layers, *model.model.visual.blocks, model.model.visual]
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    for unit in (*units, model):  # sum, not mean: each rank's loss is its share of the global loss
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM (what factor 1.0 picks alone)
    # FSDP2 sets itself up on the first forward, which must be the root's; the first call may be
    # generate(), which runs the vision unit first (see above): set up from the root now (private API).
    model._get_fsdp_state()._lazy_init()
    return model


def reshard(model) -> None:
    """Free the gathered weights that FSDP2 keeps on the root after a forward with no backward
    (generate, evaluation): until then model.parameters() are full tensors, not the optimizer's
    sharded ones. One process: nothing."""
    if world() > 1:
        model.reshard()


def full_state_dict(model, trainable_only: bool = False) -> dict:
    """The full (unsharded) model state dict on CPU, on rank 0; {} on the other ranks.
    trainable_only: leave frozen parameters out (LoRA: only the adapters are gathered and saved).
    Collective: every rank must call it. One process: the plain state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if world() == 1:
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


class Saveable:
    """Stands in for the model in save_pretrained-style code (pepo.save_atomic): its
    save_pretrained writes the gathered full state dict, so the folder is an ordinary
    checkpoint that a one-process run (or any number of processes) loads."""

    def __init__(self, model, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kw):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kw)


def saveable(model, trainable_only: bool = False):
    """Collective: gathers the full weights (trainable_only: the trained ones, see full_state_dict);
    returns a Saveable on rank 0 and None elsewhere. One process: the model itself."""
    if world() == 1:
        return model
    state = full_state_dict(model, trainable_only)
    return Saveable(model, state) if is_main() else None


def optimizer_state(model, optimizer) -> dict:
    """Full optimizer state keyed by parameter name, on CPU, on rank 0 ({} elsewhere).
    Collective. One process: optimizer.state_dict() (keyed by index)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if world() == 1:  # one process: the plain optimizer.state_dict()
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Inverse of optimizer_state. Collective: rank 0 passes the loaded dict, the others may
    pass {} (rank 0 broadcasts every tensor and each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if world() == 1:  # one process: the plain optimizer.load_state_dict()
        return optimizer.load_state_dict(state)
    # A fresh optimizer has no state yet: torch creates it with a zero-lr step, but only when no
    # parameter holds a .grad (else it fails with 'Expected device to be set').
    optimizer.zero_grad(set_to_none=True)
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


# ----------------------------------------------------------------------------------------
# Collectives: the identity in one process
# ----------------------------------------------------------------------------------------
def _reduce(x, op):
    if world() == 1:
        return x
    if torch.is_tensor(x):
        y = x.detach().clone()
        dist.all_reduce(y, op=op)
        return y
    y = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(y, op=op)
    return type(x)(y.item()) if isinstance(x, (int, float)) else y.item()


def all_sum(x):
    """Sum over ranks of a tensor or a number (same type back)."""
    return _reduce(x, dist.ReduceOp.SUM)


def all_max(x):
    """Max over ranks of a tensor or a number."""
    return _reduce(x, dist.ReduceOp.MAX)


def all_min(x):
    """Min over ranks of a tensor or a number."""
    return _reduce(x, dist.ReduceOp.MIN)


def any_true(flag: bool) -> bool:
    """True when the flag is True on some rank (e.g. a stop signal that reached one rank)."""
    return all_max(int(bool(flag))) == 1


def all_true(flag: bool) -> bool:
    """True when the flag is True on every rank (e.g. 'the loss is finite': all ranks then
    take, or all skip, the optimizer step)."""
    return all_min(int(bool(flag))) == 1


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Concatenate every rank's tensor along dim 0 (rank order). Shapes may differ: other dims
    are zero-padded at the end to the largest. Returns (global tensor, each rank's shape)."""
    if world() == 1:
        return x, [tuple(x.shape)]
    shapes = [tuple(s) for s in gather_objects(tuple(x.shape))]
    big = [max(s[d] for s in shapes) for d in range(x.dim())]
    padded = x.new_zeros(big)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes)]), shapes


def gather_values(x: torch.Tensor) -> torch.Tensor:
    """All ranks' entries of a 1-D tensor (e.g. valid PEPO weights for quantiles, rewards)."""
    return gather_rows(x.reshape(-1))[0]


def on_all_rows(fn, *tensors: torch.Tensor):
    """Apply a batch-wide function to the global batch and return this rank's rows.

    tensors: [B_r, L_r] (or [B_r]) per rank, padding = 0 (masks must be 0 there). They are
    gathered as pepo.py would see the one-process batch (rows in rank order, right-padded to
    the longest completion), fn runs on that, and the result's rows ([B] or [B, L]) of this
    rank come back, cut to this rank's length. Used for VPPO's TAS scale and the entropy-top
    mask, whose min/max/mean/threshold are over the whole batch.
    """
    if world() == 1:
        return fn(*tensors)
    gathered = [gather_rows(t) for t in tensors]
    out = fn(*(g for g, _ in gathered))
    shapes = gathered[0][1]
    start = sum(s[0] for s in shapes[: rank()])
    mine = shapes[rank()]
    out = out[start : start + mine[0]]
    return out[:, : mine[1]] if out.dim() == 2 else out


# ----------------------------------------------------------------------------------------
# Splitting the work
# ----------------------------------------------------------------------------------------
def split(n: int) -> range:
    """This rank's contiguous part of n items (prompts, eval examples): the first n % world()
    ranks get one more. Groups are never split: pass a number of prompts, not of rows."""
    base, extra = divmod(n, world())
    start = rank() * base + min(rank(), extra)
    return range(start, start + base + (rank() < extra))


def local_count(n: int) -> int:
    """How many of n global items (e.g. --prompts-per-step) this rank takes."""
    return len(split(n))


def pad_to_global_rows(batch: dict, group: dict, concat, pad_id: int) -> dict:
    """Give every rank the same number of rows by appending whole groups that carry no loss.

    FSDP runs collectives in every forward and backward, so all ranks must run the same number
    of passes (and micro-batches). A rank with fewer groups (an uneven split, or dynamic sampling
    kept more groups elsewhere) appends copies of `group` (one group of any local rollout batch,
    e.g. one it dropped) with completion_mask = 0: they add exactly 0 to the loss and gradient.
    batch may be None (the rank kept nothing). Rows added are flagged in batch['padding'] [B] bool.
    concat: pepo.concat_batches. One process: the batch, with an all-False 'padding'.
    """
    have = 0 if batch is None else batch["input_ids"].shape[0]
    need = all_max(have) - have
    if batch is not None:
        batch = dict(batch, padding=torch.zeros(have, dtype=torch.bool))
    if need == 0:
        return batch
    group_size = group["input_ids"].shape[0]
    assert need % group_size == 0
    group = dict(
        group,
        completion_mask=torch.zeros_like(group["completion_mask"]),
        padding=torch.ones(group_size, dtype=torch.bool),
    )
    parts = ([batch] if batch is not None else []) + [group] * (need // group_size)
    return concat(parts, pad_id)


def real_rows(batch: dict) -> int:
    """Rows of the local batch that are not padding (see pad_to_global_rows)."""
    pad = batch.get("padding")
    return batch["input_ids"].shape[0] - (0 if pad is None else int(pad.sum()))


def global_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over every rank's entries where mask > 0 (a logged metric of the global batch).
    One process: exactly pepo.masked_mean(x, mask).item()."""
    return (all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)).item()
