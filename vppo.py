"""VPPO building blocks: image perturbations, token visual dependency, and the two ways it shapes the update.

VPPO (arXiv 2510.09285, "Visually-Perceptive Policy Optimization") measures how much each
completion token depends on the image: run the policy once on the real image I and once on a
perturbed copy I' (random patches blacked out), and compare the two next-token distributions.
That per-token dependency S is then used twice:
  * Trajectory Advantage Shaping (TAS): rescale each completion's advantage by its mean S.
  * Token Gradient Filtering (TGF): only the top 40% most image-dependent tokens of each
    completion get a gradient.

Also here: the high-entropy-minority token mask (arXiv 2506.01939) used as a baseline.

Shapes: B = completions, L = completion length, V = vocab.  The tensor functions are pure and
return detached tensors: the scores decide *which* tokens and *how much*, never carry gradient.
Everything here needs torch and Pillow only; a function that uses a helper of this file names it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from PIL import Image, ImageFilter


# ----------------------------------------------------------------------------------------
# Image perturbations (VPPO ablation: blackening patches works best; noise, blur, grey are worse)
# ----------------------------------------------------------------------------------------
def _uniform(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """U[0, 1) numbers on `device`, drawn on the generator's device (on `device` without one), then moved.

    CPU and CUDA streams differ for the same seed, so drawing where the generator lives keeps the
    numbers a function of the generator alone: a CPU generator gives the same draws for CPU and
    CUDA inputs, and a CUDA generator works with CPU inputs (images) too.
    """
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> uint8 [H, W, 3].  Alpha / palette / greyscale become RGB, as the Qwen-VL processor does anyway."""
    image = image.convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def _to_image(x: torch.Tensor) -> Image.Image:
    """uint8 [H, W, 3] -> PIL RGB (through a Python list: ~0.05 s per megapixel)."""
    return Image.frombytes("RGB", (x.shape[1], x.shape[0]), bytes(x.cpu().reshape(-1).tolist()))


def blacken_patches(
    image: Image.Image, patch_size: int = 14, prob: float = 0.5, generator: torch.Generator | None = None
) -> Image.Image:
    """Black out each non-overlapping patch_size x patch_size block independently with probability `prob`.

    Partial blocks at the right / bottom edges are blocks too.  Output has the same size (and is RGB).
    With patch_size = the vision encoder's patch size and an image already at model resolution
    (see `resize_for_model`) every blacked block is exactly one encoder patch: VPPO (arXiv 2510.09285).
    Needs `_uniform`. The block mask becomes a Pillow mask: no per-pixel copy through Python.
    """
    image = image.convert("RGB")
    W, H = image.size
    rows, cols = math.ceil(H / patch_size), math.ceil(W / patch_size)
    keep = _uniform((rows, cols), generator) >= prob  # [0, 1): prob=0 keeps all, prob=1 keeps none
    mask = Image.frombytes("L", (cols, rows), bytes((keep.view(-1) * 255).tolist()))
    mask = mask.resize((cols * patch_size, rows * patch_size), Image.Resampling.NEAREST).crop((0, 0, W, H))
    return Image.composite(image, Image.new("RGB", image.size), mask)  # 255: the image, 0: black


def gaussian_noise(image: Image.Image, sigma: float = 189.0, generator: torch.Generator | None = None) -> Image.Image:
    """Add N(0, sigma^2) noise on the 0-255 scale, clip and round back to uint8.  Same size.
    Needs `_to_tensor`, `_to_image`; the noise is drawn on the generator's device, as `_uniform` does."""
    x = _to_tensor(image).float()
    device = None if generator is None else generator.device
    noise = torch.randn(x.shape, generator=generator, device=device).cpu() * sigma
    return _to_image((x + noise).clamp(0, 255).round().to(torch.uint8))


def gaussian_blur(image: Image.Image, radius: float = 6) -> Image.Image:
    """PIL Gaussian blur with the given radius.  Same size."""
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def solid_grey(image: Image.Image, value: int = 128) -> Image.Image:
    """Replace the whole image with one grey level: removes all visual information.  Same size."""
    return Image.new("RGB", image.size, (value, value, value))


def model_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) that the Qwen-VL image processor resizes an image to (its `smart_resize` rule).

    Each side is rounded to a multiple of `factor` (patch_size * merge_size); if that area exceeds
    max_pixels, the sides are divided by sqrt(area / max_pixels) and rounded down to multiples (at
    least one), if it falls below min_pixels they are multiplied by sqrt(min_pixels / area) and
    rounded up. Aspect ratios above 200 are refused, as the processor does.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width}: the Qwen-VL processor needs an aspect ratio below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def resize_for_model(image: Image.Image, image_processor) -> Image.Image:
    """Resize (bicubic) to exactly the size the Qwen-VL image processor would pick.

    The processor snaps H and W to multiples of patch_size * merge_size inside [min_pixels, max_pixels]
    (`model_size`, which this needs).  Perturbing *after* this resize makes perturbation blocks
    coincide with encoder patches, and the processor then leaves the size unchanged, so I and I' give the same grid
    and the same number of image tokens.  patch_size is read from the processor: 14 for
    Qwen2/2.5-VL, 16 for Qwen3-VL.

    Corner case: the rule is not idempotent when max_pixels is small and the image very
    elongated (aspect > max_pixels / factor^2, e.g. > 16:1 for max_pixels = 112*112, never for the
    default 28*28*1280): one side is pinned at `factor` and a second pass shrinks the other.
    Feeding the processor resize_for_model(image) as the *clean* image too makes I and I' the same
    size, hence the same grid, always; otherwise it changes nothing (pixel_values are bit-identical).
    """
    ip = image_processor
    # transformers 5.x keeps the pixel limits in `size` (shortest_edge = min pixels, longest_edge = max pixels)
    factor = ip.patch_size * ip.merge_size
    height, width = model_size(image.height, image.width, factor, ip.size["shortest_edge"], ip.size["longest_edge"])
    if (width, height) == image.size:
        return image.copy()
    return image.resize((width, height), Image.Resampling.BICUBIC)


def blacken_pixel_values(
    pixel_values: torch.Tensor, image_processor, prob: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`blacken_patches` applied to the Qwen-VL processor's output instead of the image.  [P, C*t*p*p] -> same

    Each row of `pixel_values` is one encoder patch of an image at model resolution (channels
    first, then temporal copies and the p x p pixels, rescaled and normalised), so blacking out
    a patch means setting its row to the normalised value of black. This equals running the
    processor on `perturb_image(image, "blacken")` (one independent draw per patch) without a
    second pass of every image through Pillow and the processor (0.25 s -> 0.04 s for 128 images, tiny model).
    This is VPPO's default perturbation here (`perturbed_pixel_values`); `perturb_image` serves the others.
    Needs `_uniform`: the draws follow the generator's device, so CUDA inputs work and match CPU ones.
    """
    ip = image_processor
    black = (
        torch.tensor([(0.0 - m) / s for m, s in zip(ip.image_mean, ip.image_std)])
        if ip.do_normalize
        else torch.zeros(len(ip.image_mean))
    )
    rows = pixel_values.reshape(pixel_values.shape[0], len(black), -1)  # [P, C, t*p*p]
    drop = _uniform(pixel_values.shape[0], generator, pixel_values.device) < prob  # [0, 1): prob=0 keeps all
    return torch.where(drop[:, None, None], black.to(rows)[None, :, None], rows).reshape(pixel_values.shape)


PERTURBATIONS = ("blacken", "blacken-raw", "noise", "blur", "grey")


def scale_into_pixel_range(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Aspect-preserving (bicubic) rescale of an image whose area lies outside [min_pixels, max_pixels]
    into that range, sides truncated to whole pixels; no snapping to the patch grid. This is the
    pre-processing step of the VPPO authors' data pipeline (EasyR1), done before their perturbation."""
    area = image.width * image.height
    if min_pixels <= area <= max_pixels:
        return image.copy()
    f = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
    return image.resize((max(1, int(image.width * f)), max(1, int(image.height * f))), Image.Resampling.BICUBIC)


def perturb_image(
    image: Image.Image, kind: str, image_processor, generator: torch.Generator | None = None
) -> Image.Image:
    """Resize to model resolution, then perturb.  kind in PERTURBATIONS.  Needs `resize_for_model`,
    `scale_into_pixel_range` and the perturbations above. Training's default, "blacken", does not come
    here: `blacken_pixel_values` does it on the processor's output; this serves the other kinds.

    The result's size equals the model-resolution size, so the processor yields the same
    image_grid_thw for I and I' and the two forward passes line up token for token
    (see `resize_for_model` for the one corner case and its fix).

    "blacken-raw" follows the VPPO authors' code instead: 14-pixel blocks of the image, scaled
    only into the processor's pixel range, are blackened, and the processor then resizes it to the
    patch grid. Blocks and encoder patches need not coincide, so a patch may end partly black,
    and black is blurred by the resize; where the image is already at model size both agree.
    """
    if kind == "blacken-raw":
        ip = image_processor
        image = scale_into_pixel_range(image, ip.size["shortest_edge"], ip.size["longest_edge"])
        return blacken_patches(image, patch_size=14, prob=0.5, generator=generator)
    image = resize_for_model(image, image_processor)
    if kind == "blacken":
        return blacken_patches(image, patch_size=image_processor.patch_size, prob=0.5, generator=generator)
    if kind == "noise":
        return gaussian_noise(image, generator=generator)
    if kind == "blur":
        return gaussian_blur(image)
    if kind == "grey":
        return solid_grey(image)
    raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {PERTURBATIONS}")


def perturbed_pixel_values(
    batch: dict, image_processor, kind: str, generator: torch.Generator | None = None, fit=None
) -> torch.Tensor:
    """pixel_values of a freshly perturbed copy of every image of a batch (one row per completion,
    its images in batch["examples"][i].images). Token ids and image grids stay the same: only the
    pixels change, so the clean and the perturbed pass line up token for token. `fit`: what was
    done to each image before the processor for the clean pass (e.g. scaling into a pixel range).
    Needs `blacken_pixel_values` ("blacken") or `perturb_image` (the other kinds)."""
    if kind == "blacken":  # VPPO's default, done on the processor output: no second processor pass
        return blacken_pixel_values(batch["pixel_values"], image_processor, 0.5, generator)
    fit = fit or (lambda image: image)
    images = [perturb_image(fit(im), kind, image_processor, generator) for ex in batch["examples"] for im in ex.images]
    vis = image_processor(images, return_tensors="pt")
    assert torch.equal(vis["image_grid_thw"], batch["image_grid_thw"].cpu()), "perturbation changed the image grid"
    return vis["pixel_values"]


# ----------------------------------------------------------------------------------------
# Token visual dependency
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def token_visual_dependency(logp: torch.Tensor, logp_perturbed: torch.Tensor) -> torch.Tensor:
    """Per-token visual dependency S = KL(pi(.|I) || pi(.|I')), k3 estimate on the sampled token.  [B, L] -> [B, L]

    VPPO (arXiv 2510.09285): with r = pi(y|I') / pi(y|I) and d = log r, k3 = r - 1 - log r >= 0
    is an unbiased, low-variance estimate of the KL when y ~ pi(.|I).  d is clamped to [-20, 20]
    so exp cannot overflow; S is clamped to [0, 10] so one outlier token cannot dominate.
    """
    d = (logp_perturbed.detach().float() - logp.detach().float()).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(0.0, 10.0)


@torch.no_grad()
def token_visual_kl(logits: torch.Tensor, logits_perturbed: torch.Tensor) -> torch.Tensor:
    """Exact per-token KL(pi(.|I) || pi(.|I')) = sum_v p(v) (log p(v) - log p'(v)).  [B, L, V] -> [B, L]

    Goes beyond the original VPPO code, which only uses the sampled-token k3 estimate
    (`token_visual_dependency`): this is the full-vocabulary value, noise-free but needing both
    [B, L, V] logit tensors. Computed over chunks of ~4M logits per input (a few dozen positions
    at V ~ 150k), so the float32 temporaries stay small next to the inputs.
    log_softmax keeps it finite for logits like +-1e4; terms with p(v) = 0 count as 0
    (so -inf logits are fine); clamped at >= 0 against rounding.
    """
    step = max(1, 2**22 // max(1, logits.shape[0] * logits.shape[-1]))
    out = []
    for a, b in zip(
        logits.detach().split(step, dim=1), logits_perturbed.detach().split(step, dim=1)
    ):  # L = 0: one empty chunk
        lp = torch.log_softmax(a.float(), dim=-1)
        lq = torch.log_softmax(b.float(), dim=-1)
        p = lp.exp()
        out.append(torch.where(p > 0, p * (lp - lq), 0.0).sum(dim=-1))
    return torch.cat(out, dim=1).clamp_min(0.0)


# ----------------------------------------------------------------------------------------
# Token masks and trajectory scale
# ----------------------------------------------------------------------------------------
def ceil_count(frac: float, n: torch.Tensor) -> torch.Tensor:
    """ceil(frac * n) for integer counts n [any shape] -> int64, exact.

    Float products can land just above an integer: in float32 (what `0.3 * int_tensor` gives)
    0.3 * 50 = 15.000001, whose ceil is 16; in float64 e.g. (0.1 * 3) * 10 = 3.0000000000000004.
    So frac is read as the nearest fraction with denominator <= 1e6 (0.4 -> 2/5, 0.3 -> 3/10) and
    the ceiling is taken in integer arithmetic: k is the mathematically correct ceiling.
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"top_frac must be in [0, 1], got {frac}")
    q = Fraction(frac).limit_denominator(10**6)
    n = n.long()
    return (n * q.numerator + q.denominator - 1) // q.denominator


def _keep_top_k(score: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row keep the k[i] valid entries with the highest score.  score, valid [R, N], k [R] -> [R, N] float 0/1

    Exactly k[i] entries are kept even with ties: rank by a stable sort (ties go to the earlier
    position) and keep rank < k.  Valid scores are made finite (NaN -> lowest) and padding -inf,
    so padding always ranks after every valid entry.
    """
    lowest = torch.finfo(torch.float32).min
    score = score.detach().float().nan_to_num(nan=lowest).masked_fill(~valid, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[i, j] = place of token j in row i
    return ((rank < k[:, None]) & valid).float()


def token_gradient_mask(dependency: torch.Tensor, mask: torch.Tensor, top_frac: float = 0.4) -> torch.Tensor:
    """Token Gradient Filtering, VPPO (arXiv 2510.09285).  dependency, mask [B, L] -> [B, L] float 0/1

    Per completion i keep the k_i = ceil(top_frac * T_i) valid tokens with the highest visual
    dependency (T_i = valid tokens of row i); padding and rows with T_i = 0 get 0.
    Row by row, so a rank's rows need nothing from the others. Needs `ceil_count`, `_keep_top_k`.
    """
    valid = mask.bool()
    k = ceil_count(top_frac, valid.sum(dim=1))
    return _keep_top_k(dependency, valid, k)


def random_token_mask(
    mask: torch.Tensor, top_frac: float = 0.4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """TGF's token count without its criterion (VPPO's ablation).  mask [B, L] -> [B, L] float 0/1

    Per completion keep ceil(top_frac * T_i) valid tokens chosen uniformly at random.
    Needs `_uniform`, `ceil_count`, `_keep_top_k`."""
    valid = mask.bool()
    scores = _uniform(mask.shape, generator, mask.device)
    return _keep_top_k(scores, valid, ceil_count(top_frac, valid.sum(dim=1)))


@torch.no_grad()
def trajectory_advantage_scale(
    dependency: torch.Tensor, mask: torch.Tensor, min_scale: float = 0.9, max_scale: float = 0.0
) -> torch.Tensor:
    """Trajectory Advantage Shaping, VPPO (arXiv 2510.09285).  dependency, mask [B, L] -> alpha [B]

    S_i = mean dependency over the valid tokens of completion i; rows with none get alpha 1
    and take no part in the normalisation,
    n_i = min-max normalised S over the batch, alpha_i = min_scale + n_i (1 - min_scale) / mean(n).
    So the least image-dependent completion gets min_scale, and
    mean(alpha) = min_scale + (1 - min_scale) mean(n) / mean(n) = 1: the average advantage
    magnitude is unchanged (over rows with valid tokens), only shifted towards visually
    grounded completions. Here the batch is the whole rollout batch (their code: a mini-batch).
    A flat batch (max - min <= 1e-6) gets alpha = 1 everywhere.
    There is no upper bound, as in the authors' code: alpha_max = min_scale + (1 - min_scale) / mean(n),
    so one completion far above the rest gets up to min_scale + (1 - min_scale) B (~14x has been seen).
    max_scale > 0 caps it (not in the paper: a remedy, --vppo-max-scale; the mean then drops below 1).
    Batch-wide: under data parallelism gather every rank's rows first (pepo.py: distributed.on_all_rows).
    """
    m = mask.float()
    has = m.sum(dim=1) > 0  # rows with no valid token (e.g. overlong-filtered) keep alpha = 1
    s = (dependency.detach().float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if not has.any():
        return torch.ones_like(s)
    lo, hi = s[has].min(), s[has].max()
    if hi - lo <= 1e-6:
        return torch.ones_like(s)
    n = ((s - lo) / (hi - lo)).clamp(0.0, 1.0)  # the max entry is 1, so mean(n) >= 1/B > 0
    alpha = min_scale + n * (1.0 - min_scale) / n[has].mean()
    if max_scale > 0:
        alpha = alpha.clamp_max(max_scale)
    return torch.where(has, alpha, torch.ones_like(s))


def entropy_top_mask(entropy: torch.Tensor, mask: torch.Tensor, top_frac: float = 0.2) -> torch.Tensor:
    """High-entropy minority (arXiv 2506.01939).  entropy, mask [B, L] -> [B, L] float 0/1

    Over the whole batch keep the ceil(top_frac * N_valid) valid tokens with the highest entropy;
    0 elsewhere, on padding, and everywhere when N_valid = 0. Batch-wide: under data parallelism
    gather every rank's rows first (pepo.py: distributed.on_all_rows). Needs `ceil_count`, `_keep_top_k`.
    """
    valid = mask.bool().reshape(1, -1)
    k = ceil_count(top_frac, valid.sum(dim=1))
    return _keep_top_k(entropy.reshape(1, -1), valid, k).reshape(entropy.shape)


if __name__ == "__main__":  # `python vppo.py [flags]` = `python pepo.py --algo vppo [flags]`
    import sys

    import pepo

    pepo.main(["--algo", "vppo", *sys.argv[1:]])
