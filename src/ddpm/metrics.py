"""Sample-quality and likelihood metrics: FID and KID with their floors, classifier scores, held-out bits/dim.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) are torchmetrics' FrechetInceptionDistance and
KernelInceptionDistance, fed with features from a pluggable extractor:

- `digits`: the penultimate (128-d) features of the small CNN in ddpm.digits_classifier, trained on the
  digits train split only (shipped weights, no download);
- `inception`: Inception-v3 pool features (2048-d) from torch-fidelity, the standard FID network; needs
  `pip install -e .[inception]` and the weights file (never downloaded here, see `inception_extractor`).

Protocol (`SampleEvaluator`, `evaluate_samples`):
- reference R: the real images passed as `real` (for digits, the whole val split: 359 images);
- fid / kid: the n generated samples against R;
- fid_floor / kid_floor: the same metric, against the same R, of n real images disjoint from R (drawn
  from `floor_real`, for digits the train split), averaged over `floor_repeats` draws (the `_std` keys
  give their spread). It is what a sampler that draws exactly from the data distribution would score
  at this sample size; FID is biased upward at small n, so compare a FID with its floor, not with 0.
  If `floor_real` is None, `real` is split in two disjoint halves by a seeded permutation: the first is
  R, the second supplies the floor's real images. If n exceeds the floor set, the floor is the score of
  the whole floor set (n_floor < n, reported), which carries no sampling noise: a sampler reproducing those
  images exactly scores above it at n (digits: 10.7 at n = 2000 against 9.33, bench/fid_floor.py), so
  compare the samples' `fid_infinity` with that floor instead.
- Real features (R and the floor set) are computed once and cached on disk under `cache_dir`
  (default ~/.cache/ddpm/ref_stats), in a file named by dataset, split, extractor (with its weights'
  digest) and sample count, plus a fingerprint of the images; so an evaluation during training
  costs the extractor's pass over the generated samples only.
- precision / recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models"): the features of a set span a manifold, the union of balls around each feature with
  the radius of its k-th nearest neighbour in the set (k = 3); precision is the fraction of samples inside
  the manifold of R (fidelity), recall the fraction of R inside the manifold of the samples (diversity).
  Their floors are the same scores of n real images.
- confidence: mean top-class probability of the digits classifier on the samples; coverage: entropy
  of the predicted-class histogram divided by log(10) (1 = every digit equally often). Their `_real`
  keys hold the same scores on R. Both are meaningful for digits data only.

Papers' numbers use Inception features and a different protocol: Ho et al. 2020 report CIFAR-10 FID
of 50k samples against the 50k training images (FID 3.17). Numbers are comparable across runs only
at the same extractor, reference set and sample count.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm.digits_classifier import WEIGHTS_PATH, DigitsFeatures, load_digits_classifier, weights_digest
from ddpm.registry import registrar

SampleMetric = Literal["fid", "kid", "precision", "recall", "confidence", "coverage"]  # computed by SampleEvaluator
Metric = Literal["fid", "kid", "precision", "recall", "confidence", "coverage", "bpd"]  # bpd: heldout_bits_per_dim
FEATURE_METRICS = ("fid", "kid", "precision", "recall")  # those computed on the extractor's features
HIGHER_IS_BETTER = ("precision", "recall", "confidence", "coverage")  # the others (fid, kid, bpd) fall as samples improve
PR_NEIGHBOURS = 3  # k of the k-NN balls of precision and recall (Kynkaanniemi et al. 2019)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_INSTALL = "pip install -e .[inception]"


class MetricsSetupError(ValueError):
    """A metric cannot run as configured (unknown name, missing package or weights); the message is one line."""


def check_metrics(names: Iterable[str]) -> tuple[str, ...]:
    """Metric names from a config, validated at once: a typo raises MetricsSetupError listing the choices."""
    names = tuple(names)
    unknown = [m for m in names if m not in get_args(Metric)]
    if unknown:
        raise MetricsSetupError(f"unknown metric(s) {', '.join(map(str, unknown))}; choose from {', '.join(get_args(Metric))}")
    return names


# ---- feature extractors -------------------------------------------------------------------------
# An extractor is an nn.Module mapping images (B, C, H, W) in [-1, 1] to features (B, num_features);
# it has `num_features` (what torchmetrics reads) and `name` (what names its cache entries).

ExtractorFactory = Callable[..., nn.Module]
EXTRACTORS: dict[str, ExtractorFactory] = {}


register_extractor = registrar(EXTRACTORS)  # `@register_extractor(name)` makes `factory(**options) -> nn.Module` extractor `name`.


def build_extractor(name: str, **options: Any) -> nn.Module:
    """The registered extractor `name`, in eval mode; raises MetricsSetupError at once if it cannot run."""
    if name not in EXTRACTORS:
        raise MetricsSetupError(f"unknown feature extractor {name!r}; choose one of {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](**options).eval()


@register_extractor("digits")
def digits_extractor(weights: str | Path | None = None) -> nn.Module:
    """Penultimate features (128-d) of the digits classifier (shipped weights unless `weights` is given)."""
    path = Path(weights) if weights is not None else WEIGHTS_PATH
    return DigitsFeatures(load_digits_classifier(path), name=f"digits-{weights_digest(path)}")


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (the TF-FID port) pool3 features, 2048-d, for images in [-1, 1].

    Images are quantised to uint8 as a PNG would store them; 1-channel images are repeated to RGB.
    torch-fidelity resizes to 299x299 with TF1's bilinear interpolation itself.
    """

    num_features = 2048
    name = "inception-6726825d"

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
        return self.net(x)[0]  # (B, 2048)


@register_extractor("inception")
def inception_extractor(weights: str | Path | None = None, config_key: str = "inception_weights") -> nn.Module:
    """Inception-v3 features; fails at once, never downloads.

    Needs torch-fidelity (`pip install -e .[inception]`) and the weights file
    weights-inception-2015-12-05-6726825d.pth, either at `weights` or in torch hub's checkpoints folder
    (`torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME/hub/checkpoints). `config_key` is the setting
    the error message tells the user to set.
    """
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:  # also a broken torchvision underneath
        raise MetricsSetupError(
            f"the inception feature extractor needs torch-fidelity ({err}); install it with "
            f"`{INCEPTION_INSTALL}` (it pulls torchvision and a matching torch build; on CPU-only "
            "machines prefer extractor=digits)"
        ) from None
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    path = Path(weights).expanduser() if weights is not None else hub_path
    if not path.is_file():
        raise MetricsSetupError(
            f"Inception weights {INCEPTION_WEIGHTS_FILE} not found at {path}; download it from "
            f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE} "
            f"and put it at {hub_path}, or set {config_key}=/path/to/{INCEPTION_WEIGHTS_FILE} (nothing is downloaded at run time)"
        )
    return InceptionFeatures(path)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, D) float32 of images (N, C, H, W) in [-1, 1], in batches, autocast off."""
    device = next(extractor.parameters()).device
    with torch.autocast(device.type, enabled=False):
        return torch.cat(
            [extractor(images[i : i + batch_size].to(device).float()).float() for i in range(0, len(images), batch_size)]
        )


# ---- cached real features -----------------------------------------------------------------------


def _name(extractor: nn.Module) -> str:
    return getattr(extractor, "name", type(extractor).__name__)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm/ref_stats, or ~/.cache/ddpm/ref_stats."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm" / "ref_stats"


def fingerprint(images: Tensor) -> str:
    """First 10 hex digits of the sha1 of the images' bytes (and shape): a stale cache entry cannot match."""
    array = images.detach().cpu().contiguous().numpy()
    digest = hashlib.sha1(str(tuple(array.shape)).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:10]


def cache_path(cache_dir: str | Path, dataset: str, split: str, extractor: nn.Module, images: Tensor) -> Path:
    """<cache_dir>/<dataset>_<split>_<extractor name>_n<N>_<fingerprint>.safetensors."""
    safe = lambda s: "".join(c if c.isalnum() or c in "-." else "-" for c in str(s))  # noqa: E731
    name = f"{safe(dataset)}_{safe(split)}_{safe(_name(extractor))}_n{len(images)}_{fingerprint(images)}.safetensors"
    return Path(cache_dir) / name


class RealFeatures(NamedTuple):
    """Features of a set of real images, and their FID statistics in torchmetrics' state form."""

    features: Tensor  # (N, D) float32, what KID needs
    sum: Tensor  # (D,) float64, sum over images
    cov_sum: Tensor  # (D, D) float64, features^T features


def real_features(
    images: Tensor,
    extractor: nn.Module,
    dataset: str,
    split: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
) -> RealFeatures:
    """Features of real images (N, C, H, W) in [-1, 1], read from the cache or computed once and written to it.

    The file (see `cache_path`) is written atomically, so concurrent runs (or DDP ranks) at worst
    compute it twice.
    """
    from safetensors.torch import load_file, save_file

    path = cache_path(cache_dir if cache_dir is not None else default_cache_dir(), dataset, split, extractor, images)
    if path.is_file():
        return RealFeatures(**load_file(str(path)))
    features = extract_features(extractor, images, batch_size).cpu()
    f64 = features.double()
    real = RealFeatures(features.contiguous(), f64.sum(0), f64.T @ f64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    metadata = {"dataset": dataset, "split": split, "extractor": _name(extractor), "n": str(len(images))}
    save_file(real._asdict(), str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return real


# ---- the metrics --------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Identity 'extractor': torchmetrics receives features computed (and cached) by this module."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def knn_radii(features: Tensor, k: int = PR_NEIGHBOURS, chunk: int = 1024) -> Tensor:
    """Each feature's distance (N,) to its k-th nearest neighbour among the others (itself excluded)."""
    if len(features) <= k:
        raise MetricsSetupError(f"precision/recall need more than k = {k} feature vectors per set, got {len(features)}")
    return torch.cat([torch.cdist(features[i : i + chunk], features).kthvalue(k + 1, dim=1).values for i in range(0, len(features), chunk)])


def manifold_fraction(query: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """The fraction of `query` rows inside the manifold of `support`: within radii[j] of some support row j."""
    inside = [(torch.cdist(query[i : i + chunk], support) <= radii).any(dim=1) for i in range(0, len(query), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3) of features fake (n, D) against real
    (N, D): precision = the fraction of fake inside the k-NN manifold of real, recall = of real inside fake's."""
    real, fake = real.double(), fake.double()
    return manifold_fraction(fake, real, knn_radii(real, k)), manifold_fraction(real, fake, knn_radii(fake, k))


def classifier_scores(probs: Tensor) -> tuple[float, float]:
    """(confidence, coverage) of class probabilities (N, K): mean top-class probability, and the
    entropy of the argmax histogram over log K (1 = uniform over the K classes, 0 = a single class)."""
    confidence = probs.max(dim=1).values.mean()
    freq = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).double() / len(probs)
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return float(confidence), float(entropy / math.log(probs.shape[1])) + 0.0  # + 0.0: no "-0" for one class


class SampleEvaluator:
    """Scores generated samples against cached real features (see the module docstring for the protocol).

    Construct it once (at the start of training or sampling: a missing package or weights file fails
    here, not after training); each call then costs one extractor pass over the samples (the floors
    for a new sample count are computed at its first call and kept). No cross-process sync: under DDP,
    call it on one rank with all samples (e.g. gathered to global rank 0).

    Args:
        real: reference images (N, C, H, W) in [-1, 1], the data's held-out split, preprocessed exactly
            as the model's training data (same resolution and channels).
        floor_real: real images disjoint from `real` (e.g. the train split) for the floors; None splits
            `real` into two halves instead.
        metrics: any of "fid", "kid", "precision", "recall", "confidence", "coverage" (the last two: digits only).
        extractor: a registered extractor name ("digits", "inception") or a module with `num_features`
            and `name`; `extractor_options` go to its factory (e.g. {"weights": path}).
        dataset, split, floor_split: name the cache entries; include anything that changes the images
            (e.g. "digits-16px" for upsampled digits).
        cache_dir: where real features are cached (default ~/.cache/ddpm/ref_stats).
        floor_repeats: draws of n real images averaged into each floor.
        kid_subsets, kid_subset_size: KID's subsets; the subset size is capped at the smallest set.
        seed: seeds the floor draws, the halves split and KID's subsets.
    """

    def __init__(
        self,
        real: Tensor,
        floor_real: Tensor | None = None,
        metrics: Iterable[str] = ("fid", "kid", "precision", "recall", "confidence", "coverage"),
        extractor: str | nn.Module = "digits",
        extractor_options: dict[str, Any] | None = None,
        dataset: str = "digits",
        split: str = "val",
        floor_split: str = "train",
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        floor_repeats: int = 5,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.metrics = tuple(metrics)
        unknown = [m for m in self.metrics if m not in get_args(SampleMetric)]
        if unknown:
            raise MetricsSetupError(f"unknown sample metric(s) {unknown}; choose from {', '.join(get_args(SampleMetric))}")
        if floor_repeats < 1:
            raise MetricsSetupError(f"floor_repeats must be >= 1, got {floor_repeats}")
        self.batch_size, self.floor_repeats, self.kid_subsets, self.kid_subset_size = (
            batch_size, floor_repeats, kid_subsets, kid_subset_size
        )
        self.seed = seed
        self.device = torch.device(device)
        self.extractor: nn.Module | None = None
        self.classifier: nn.Module | None = None

        if floor_real is None:
            perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
            half = (len(real) + 1) // 2
            real, floor_real = real[perm[:half]], real[perm[half:]]
            split, floor_split = f"{split}.half0", f"{split}.half1"
        self.n_reference, self.n_floor_set = len(real), len(floor_real)

        if any(m in FEATURE_METRICS for m in self.metrics):
            options = extractor_options or {}
            self.extractor = build_extractor(extractor, **options) if isinstance(extractor, str) else extractor.eval()
            self.extractor.requires_grad_(False).to(self.device)
            self.ref = real_features(real, self.extractor, dataset, split, cache_dir, batch_size)
            self.floor_set = real_features(floor_real, self.extractor, dataset, floor_split, cache_dir, batch_size).features
            self._floors: dict[int, dict[str, float]] = {}
        if "confidence" in self.metrics or "coverage" in self.metrics:
            self.classifier = load_digits_classifier(device=self.device)
            self.real_scores = classifier_scores(self._probs(real))

    def _probs(self, images: Tensor) -> Tensor:
        assert self.classifier is not None
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            logits = torch.cat(
                [self.classifier(images[i : i + self.batch_size].to(self.device)) for i in range(0, len(images), self.batch_size)]
            )
        return logits.softmax(dim=1).cpu()  # (N, 10)

    def _distances(self, fake: Tensor) -> dict[str, float]:
        """FID, KID, precision and recall of fake features (n, D) against the reference features."""
        out: dict[str, float] = {}
        ref = self.ref.features.double()
        if "fid" in self.metrics:
            fid = FrechetInceptionDistance(feature=_Precomputed(ref.shape[1]), sync_on_compute=False)
            fid.real_features_sum = self.ref.sum.clone()  # the cached statistics, as if `update`d
            fid.real_features_cov_sum = self.ref.cov_sum.clone()
            fid.real_features_num_samples = torch.tensor(len(ref))
            fid.update(fake.double(), real=False)
            out["fid"] = float(fid.compute())
        if "kid" in self.metrics:
            size = min(self.kid_subset_size, len(ref), len(fake))
            subsets = 1 if size == len(ref) == len(fake) else self.kid_subsets  # one subset is then all of both
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "will save all extracted features": that is the point
                kid = KernelInceptionDistance(
                    feature=_Precomputed(ref.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
                )
            kid.update(ref, real=True)
            kid.update(fake.double(), real=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # KID draws its subsets from the global generator
                mean, std = kid.compute()
            out["kid"], out["kid_std"] = float(mean), float(std)
        if "precision" in self.metrics or "recall" in self.metrics:
            precision, recall = precision_recall(ref, fake)
            out.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in self.metrics})
        return out

    def floors(self, n: int) -> dict[str, float]:
        """<metric>_floor and <metric>_floor_std (mean and std over `floor_repeats` draws) of n_floor real images,
        for fid, kid, precision and recall."""
        n_floor = min(n, self.n_floor_set)
        if n_floor not in self._floors:
            repeats = 1 if n_floor == self.n_floor_set else self.floor_repeats
            draws = []
            for r in range(repeats):
                idx = torch.randperm(self.n_floor_set, generator=torch.Generator().manual_seed(self.seed + r))
                draws.append(self._distances(self.floor_set[idx[:n_floor]]))
            floors: dict[str, float] = {"n_floor": n_floor}
            for key in FEATURE_METRICS:
                if key in draws[0]:
                    values = torch.tensor([d[key] for d in draws], dtype=torch.float64)
                    floors[f"{key}_floor"] = float(values.mean())
                    floors[f"{key}_floor_std"] = float(values.std()) if repeats > 1 else 0.0
            self._floors[n_floor] = floors
        return self._floors[n_floor]

    def __call__(self, samples: Tensor) -> dict[str, float]:
        """Scores of samples (n, C, H, W) in [-1, 1]: the requested metrics, their floors and the counts."""
        if len(samples) < 2:
            raise MetricsSetupError(f"need at least 2 samples to score, got {len(samples)}")
        results: dict[str, float] = {"n_samples": len(samples)}
        if self.extractor is not None:
            fake = extract_features(self.extractor, samples, self.batch_size).cpu()
            results.update(self._distances(fake))
            results.update(self.floors(len(samples)))
            results["n_reference"] = self.n_reference
        if self.classifier is not None:
            confidence, coverage = classifier_scores(self._probs(samples))
            scores = {"confidence": confidence, "confidence_real": self.real_scores[0],
                      "coverage": coverage, "coverage_real": self.real_scores[1]}
            results.update({k: v for k, v in scores.items() if k.split("_")[0] in self.metrics})
        return results


def evaluate_samples(samples: Tensor, real: Tensor, floor_real: Tensor | None = None, **options: Any) -> dict[str, float]:
    """One-shot `SampleEvaluator(real, floor_real, **options)(samples)`; see SampleEvaluator for options."""
    return SampleEvaluator(real, floor_real, **options)(samples)


def fid_infinity(fid_at: dict[int, float]) -> float:
    """FID extrapolated to infinitely many samples from FIDs of k samples: the intercept of their line in 1/k.

    FID of k samples is biased upwards by about c / k with c depending on the generator (Chong & Forsyth
    2020, "Effectively Unbiased FID and Inception Score and where to find them", Sec. 3), so two samplers
    compared at one small k are also compared by their biases; FID_inf removes that term. `fid_at` maps
    at least two distinct k to the FID of k samples (e.g. nested prefixes of one draw) against one reference.
    """
    if len(fid_at) < 2:
        raise ValueError(f"fid_infinity needs FIDs at two or more sample counts, got {sorted(fid_at)}")
    inv_k = torch.tensor([1.0 / int(k) for k in fid_at], dtype=torch.float64)
    fid = torch.tensor([float(v) for v in fid_at.values()], dtype=torch.float64)
    design = torch.stack([torch.ones_like(inv_k), inv_k], dim=1)
    return float(torch.linalg.lstsq(design, fid[:, None]).solution[0, 0])


# ---- likelihood ---------------------------------------------------------------------------------


def heldout_bits_per_dim(
    diffusion: Any,
    model: Callable[..., Tensor],
    images: Tensor,
    batch_size: int = 256,
    num_timesteps: int | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
) -> float:
    """Mean variational bound in bits/dim of held-out images (N, C, H, W) in [-1, 1].

    `GaussianDiffusion.bits_per_dim` per batch; `num_timesteps` = K < T gives its unbiased stratified K-term estimate
    (a quick estimate for monitoring), None all T (the value to report). `labels` (N,): the images' class labels,
    passed to the model as `y`, for a class-conditional model (without them it would be scored on its null label).
    """
    device = diffusion.betas.device
    total = 0.0
    for i in range(0, len(images), batch_size):
        x0 = images[i : i + batch_size].to(device)
        kwargs = None if labels is None else {"y": labels[i : i + batch_size].to(device)}
        bpd = diffusion.bits_per_dim(model, x0, num_timesteps=num_timesteps, generator=generator, model_kwargs=kwargs)
        total += float(bpd.total.sum())
    return total / len(images)


# ---- reporting ----------------------------------------------------------------------------------

# (metric, floor or real-data key, its std key, sample-count key)
_TABLE_ROWS = [
    ("fid", "fid_floor", "fid_floor_std", "n_samples"),
    ("kid", "kid_floor", "kid_floor_std", "n_samples"),
    ("precision", "precision_floor", "precision_floor_std", "n_samples"),
    ("recall", "recall_floor", "recall_floor_std", "n_samples"),
    ("confidence", "confidence_real", None, "n_samples"),
    ("coverage", "coverage_real", None, "n_samples"),
    ("bpd", None, None, "bpd_n"),
]


def print_metrics_table(results: dict[str, float], title: str = "metrics", console: Any = None) -> None:
    """A rich table: metric, value, floor (FID/KID) or real-data value (classifier scores), n."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "value", "floor / real", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, ref_key, std_key, n_key in _TABLE_ROWS:
        if key not in results:
            continue
        value = f"{results[key]:.4g}"
        if key == "kid" and results.get("kid_std", 0) > 0:
            value += f" ± {results['kid_std']:.2g}"
        ref = f"{results[ref_key]:.4g}" if ref_key in results else "-"
        if std_key in results and results[std_key] > 0:
            ref += f" ± {results[std_key]:.2g}"
        n = str(results.get(n_key, "-"))
        if ref_key and ref_key.endswith("_floor") and results.get("n_floor", results.get(n_key)) != results.get(n_key):
            ref += f" (n={results['n_floor']})"
        table.add_row(key, value, ref, n)
    (console or Console()).print(table)
