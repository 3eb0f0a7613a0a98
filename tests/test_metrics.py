"""Tests for ddpm.metrics and ddpm.digits_classifier: digits-FID/KID against their floors, the shipped
classifier, classifier scores, the reference-feature cache, the inception extractor's setup errors
(no torch-fidelity here, no network) and held-out bits/dim. A few seconds on 2 CPU cores."""
from __future__ import annotations

import json
import re
import socket
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm import GaussianDiffusion, UNet, make_betas
from ddpm.data import digits_split
from ddpm.digits_classifier import (
    INFO_PATH,
    WEIGHTS_PATH,
    accuracy,
    classifier_info,
    load_digits_classifier,
    to_digits_input,
)
from ddpm.metrics import (
    INCEPTION_WEIGHTS_FILE,
    MetricsSetupError,
    SampleEvaluator,
    build_extractor,
    check_metrics,
    classifier_scores,
    evaluate_samples,
    fid_infinity,
    heldout_bits_per_dim,
    knn_radii,
    precision_recall,
    print_metrics_table,
)


@pytest.fixture(scope="module")
def val():
    return digits_split("val")


@pytest.fixture(scope="module")
def train():
    return digits_split("train")


@pytest.fixture(scope="module")
def evaluator(val, train, tmp_path_factory):
    """The digits protocol: reference = val split (359), floor images drawn from the train split."""
    return SampleEvaluator(val[0], train[0], cache_dir=tmp_path_factory.mktemp("ref_stats"))


def real_subset(train, n: int, seed: int) -> torch.Tensor:
    """n train images (real digits disjoint from the val reference), drawn with a seed unlike the floor's."""
    return train[0][torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[:n]]


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) (Heusel et al. 2017 eq. 6); the trace of the root
    is the sum of the square roots of cov1 cov2's eigenvalues, which are real and non-negative."""
    root_trace = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * root_trace)


def blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur with background (-1) padding."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), k)


# ---- the shipped classifier ---------------------------------------------------------------------


def test_shipped_classifier_reproduces_recorded_accuracy(val):
    info = classifier_info()
    assert info["val_accuracy"] >= 0.97
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    assert abs(accuracy(load_digits_classifier(), *val) - info["val_accuracy"]) <= 0.005
    assert json.loads(INFO_PATH.read_text())["n_val"] == len(val[0])


def test_classifier_input_accepts_upsampled_and_rgb(val):
    x = val[0][:16]
    up = F.interpolate(x, scale_factor=2, mode="nearest")  # a `resolution: 16` dataset
    rgb = x.expand(-1, 3, -1, -1)
    torch.testing.assert_close(to_digits_input(up), x)
    torch.testing.assert_close(to_digits_input(rgb), x)
    with pytest.raises(ValueError, match="expects"):
        to_digits_input(torch.zeros(2, 2, 8, 8))


# ---- FID / KID against the floor ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_disjoint_real_digits_score_near_the_floor(evaluator, train, seed):
    r = evaluator(real_subset(train, 359, seed))
    assert r["n_samples"] == r["n_floor"] == 359 and r["n_reference"] == 359
    assert 0.5 * r["fid_floor"] <= r["fid"] <= 1.5 * r["fid_floor"]
    assert abs(r["kid"] - r["kid_floor"]) <= 3 * r["kid_floor_std"] + 1e-3


def test_noise_and_blurred_digits_score_far_above_the_floor(evaluator, train):
    real = real_subset(train, 359, seed=1)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for fake in (noise, blur(real)):
        r = evaluator(fake)
        assert r["fid"] > 10 * r["fid_floor"]  # measured: noise ~22x, blur ~21x
        assert r["kid"] > r["kid_floor"] + 20 * r["kid_floor_std"]  # measured: > 50 stds


def test_halves_protocol_without_floor_set(val, train, tmp_path):
    r = evaluate_samples(real_subset(train, 180, seed=1), val[0], metrics=("fid", "kid"), cache_dir=tmp_path)
    assert r["n_reference"] == 180 and r["n_floor"] == 179  # 359 val images: halves of 180 and 179
    assert 0.5 * r["fid_floor"] <= r["fid"] <= 1.5 * r["fid_floor"]
    assert set(r) == {"fid", "kid", "kid_std", "fid_floor", "fid_floor_std", "kid_floor", "kid_floor_std",
                      "n_floor", "n_samples", "n_reference"}


def test_a_copy_of_the_floor_set_scores_its_floor_only_at_infinitely_many_samples(val, train, tmp_path):
    """A sampler that reproduces the train images exactly (draws them with replacement): at n = 2000 > 1438 its FID
    lies above the floor (the whole train set, no sampling noise; measured 1.15x over 20 draws), while its FID
    extrapolated to infinitely many samples recovers the floor (measured 1.01x, one draw's sd 1.3 FID; the
    tolerance is 3.5 standard errors of the mean of 12 draws)."""
    evaluator = SampleEvaluator(val[0], train[0], metrics=("fid",), cache_dir=tmp_path)
    floor = evaluator.floors(evaluator.n_floor_set)["fid_floor"]
    assert evaluator.floors(2000)["n_floor"] == 1438
    g = torch.Generator().manual_seed(0)
    at_2000, extrapolated = [], []
    for _ in range(12):
        x = train[0][torch.randint(len(train[0]), (2000,), generator=g)]
        fids = {k: evaluator(x[:k])["fid"] for k in (500, 1000, 2000)}
        at_2000.append(fids[2000])
        extrapolated.append(fid_infinity(fids))
    assert sum(at_2000) / 12 > 1.08 * floor
    assert abs(sum(extrapolated) / 12 - floor) < 3.5 * 1.3 / 12**0.5


def test_more_samples_than_floor_images_reports_the_floor_size(val, train, tmp_path):
    floor_real = train[0][:100]
    r = evaluate_samples(real_subset(train, 200, seed=1), val[0], floor_real, metrics=("fid",), cache_dir=tmp_path)
    assert r["n_samples"] == 200 and r["n_floor"] == 100 and r["fid_floor_std"] == 0.0


# ---- classifier scores --------------------------------------------------------------------------


# ---- improved precision and recall (Kynkaanniemi et al. 2019) ------------------------------------


def test_knn_radius_is_the_kth_neighbour_excluding_itself():
    """Points 0, 1, 3, 7 on a line: the 1st/2nd/3rd neighbour distances of 0 are 1, 3, 7; of 3: 2, 3, 4."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, k=3).tolist() == [7.0, 6.0, 4.0, 7.0]
    with pytest.raises(MetricsSetupError, match="more than k = 3"):
        knn_radii(x[:3], k=3)


def test_precision_recall_closed_forms():
    """The same set: both 1; a subset of the real set: precision 1; a set far from the real one: both 0."""
    real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real[:50])[0] == 1.0
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_see_mode_dropping_and_blur():
    """Real: two far-apart Gaussian clusters of 1000. Samples of one cluster only keep precision (> 0.9) and
    lose half the recall (0.5 +- 0.05); samples spread far wider than the data (5x the scale, covering both)
    keep recall high (> 0.9) and lose precision (< 0.3)."""
    g = torch.Generator().manual_seed(1)
    centers = torch.zeros(2, 4)
    centers[1, 0] = 50.0
    real = torch.cat([torch.randn(1000, 4, generator=g) + c for c in centers])
    one_mode = torch.randn(1000, 4, generator=g) + centers[0]
    precision, recall = precision_recall(real, one_mode)
    assert precision > 0.9 and abs(recall - 0.5) < 0.05, (precision, recall)
    spread = torch.randn(2000, 4, generator=g) * torch.tensor([25.0, 5.0, 5.0, 5.0]) + centers.mean(0)
    precision, recall = precision_recall(real, spread)
    assert precision < 0.3 and recall > 0.9, (precision, recall)


def test_precision_recall_of_real_digits_reach_their_floors(evaluator, val, train, tmp_path):
    """Disjoint real digits score as their floors (real images again: about 0.9, with a spread of 0.01-0.02 over
    draws) within 0.06; uniform noise falls far below both (about 0.1)."""
    pr = SampleEvaluator(val[0], train[0], metrics=("precision", "recall"), cache_dir=tmp_path)
    real = pr(real_subset(train, 300, seed=11))
    assert set(real) >= {"precision", "recall", "precision_floor", "recall_floor", "precision_floor_std"}
    assert abs(real["precision"] - real["precision_floor"]) < 0.06 and abs(real["recall"] - real["recall_floor"]) < 0.06
    assert real["precision_floor"] > 0.85 and real["recall_floor"] > 0.85, real
    noise = pr(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["precision"] < 0.25 and noise["recall"] < 0.25, noise


def test_classifier_scores_closed_forms():
    one_hot = torch.eye(10).repeat(3, 1)  # every class equally often, fully confident
    assert classifier_scores(one_hot) == pytest.approx((1.0, 1.0))
    two = torch.eye(10)[torch.tensor([0, 1] * 5)]
    assert classifier_scores(two)[1] == pytest.approx(torch.log(torch.tensor(2.0)).item() / torch.log(torch.tensor(10.0)).item())
    uniform = torch.full((4, 10), 0.1)
    assert classifier_scores(uniform)[0] == pytest.approx(0.1)


def test_confidence_and_coverage_on_real_and_collapsed_digits(evaluator, val, train):
    r = evaluator(val[0])
    assert r["confidence"] > 0.95 and r["coverage"] > 0.97
    assert r["confidence_real"] == r["confidence"] and r["coverage_real"] == r["coverage"]
    threes = train[0][train[1] == 3]
    collapsed = threes[:1].repeat(359, 1, 1, 1)
    assert evaluator(collapsed)["coverage"] < 0.05
    few = threes.repeat(3, 1, 1, 1)[:359]  # real, confident, but a single class
    r = evaluator(few)
    assert r["confidence"] > 0.9 and r["coverage"] < 0.2


# ---- the reference cache ------------------------------------------------------------------------


class Counting(nn.Module):
    """Wraps an extractor and counts the images it is asked to embed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.num_features, self.name, self.images = inner, inner.num_features, inner.name, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


def test_reference_features_are_cached_by_key(val, train, tmp_path):
    samples = real_subset(train, 100, seed=1)
    options = dict(metrics=("fid", "kid"), cache_dir=tmp_path)
    first = Counting(build_extractor("digits"))
    r1 = SampleEvaluator(val[0], train[0], extractor=first, **options)(samples)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and first.images == 359 + 1438 + 100  # val, train, samples
    assert any("digits_val_digits-" in f.name and "_n359_" in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = Counting(build_extractor("digits"))
    r2 = SampleEvaluator(val[0], train[0], extractor=second, **options)(samples)
    assert second.images == 100  # only the samples
    assert r2 == r1
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    third = Counting(build_extractor("digits"))
    SampleEvaluator(val[0], train[0], extractor=third, dataset="digits-other", **options)
    fourth = Counting(build_extractor("digits"))
    SampleEvaluator(val[0][:300], train[0], extractor=fourth, **options)  # another sample count
    assert third.images == 359 + 1438 and fourth.images == 300
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


# ---- setup errors -------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_inception_without_torch_fidelity_fails_at_once(monkeypatch, no_network, val, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # absent (as in CI) even where installed
    with pytest.raises(MetricsSetupError, match=re.escape("pip install -e .[inception]")):
        build_extractor("inception")
    with pytest.raises(MetricsSetupError, match="torch-fidelity"):
        SampleEvaluator(val[0], metrics=("fid",), extractor="inception", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # failed before computing anything


@pytest.fixture
def fake_torch_fidelity(monkeypatch):
    """A stand-in torch_fidelity whose extractor records the weights path it was given."""
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")

    class FeatureExtractorInceptionV3(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            self.weights_path = feature_extractor_weights_path
            self.fc = nn.Linear(3, 2048)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return (self.fc(x.float().mean(dim=(2, 3))),)

    module.FeatureExtractorInceptionV3 = FeatureExtractorInceptionV3
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_inception_without_weights_names_file_place_and_key(monkeypatch, no_network, fake_torch_fidelity, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub_file = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(MetricsSetupError) as err:
        build_extractor("inception", config_key="metrics.inception_weights")
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(hub_file) in message
    assert "metrics.inception_weights=" in message and "\n" not in message
    with pytest.raises(MetricsSetupError, match=re.escape(str(tmp_path / "nowhere.pth"))):
        build_extractor("inception", weights=tmp_path / "nowhere.pth")

    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"")
    extractor = build_extractor("inception")  # found in the hub cache, passed on explicitly: no download
    assert extractor.net.weights_path == str(hub_file) and extractor.num_features == 2048
    assert extractor(torch.rand(2, 1, 8, 8) * 2 - 1).shape == (2, 2048)


def test_unknown_names_list_the_choices(val):
    with pytest.raises(MetricsSetupError, match="digits, inception"):
        build_extractor("clip")
    with pytest.raises(MetricsSetupError, match="fid, kid, precision, recall, confidence, coverage"):
        SampleEvaluator(val[0], metrics=("fid", "is"))
    assert check_metrics(["fid", "kid", "bpd"]) == ("fid", "kid", "bpd")
    with pytest.raises(MetricsSetupError, match="unknown metric.*fdi.*fid, kid, precision, recall, confidence, coverage, bpd"):
        check_metrics(["fdi", "bpd"])


# ---- reporting ----------------------------------------------------------------------------------


def test_metrics_table_shows_value_floor_and_n():
    from rich.console import Console

    console = Console(record=True, width=100)
    results = {"fid": 14.6, "fid_floor": 16.2, "fid_floor_std": 1.6, "confidence": 0.99, "confidence_real": 0.994,
               "n_samples": 359, "n_floor": 359, "bpd": 1.23, "bpd_n": 359}
    print_metrics_table(results, console=console)
    text = console.export_text()
    assert re.search(r"fid\s.*14\.6\s.*16\.2 ± 1\.6\s.*359", text)
    assert re.search(r"bpd\s.*1\.23\s.*-\s.*359", text)
    assert "kid" not in text


# ---- bits/dim -----------------------------------------------------------------------------------


def test_heldout_bits_per_dim_drops_with_brief_training(val, train):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = UNet(8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), dropout=0.0, norm_groups=8)
    heldout = val[0][:64]

    def bpd() -> float:
        model.eval()
        return heldout_bits_per_dim(diffusion, model, heldout, batch_size=64, num_timesteps=20,
                                    generator=torch.Generator().manual_seed(0))

    untrained = bpd()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(20):
        x0 = real_subset(train, 64, seed=step)
        loss = diffusion.training_loss(model, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = bpd()
    assert torch.isfinite(torch.tensor([untrained, trained])).all()
    assert trained < untrained - 2.0, (untrained, trained)  # measured: 18.4 -> 9.4 bits/dim


def test_fid_infinity_removes_the_small_sample_bias():
    """Gaussian features: FID of k samples against a fixed reference is biased up by about c / k; the intercept
    of FID against 1/k over nested prefixes (Chong & Forsyth 2020) recovers the closed-form Frechet distance
    of the generating Gaussian to the reference's statistics within 3%, where FID of 25 samples is over 40% off."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    ref_mu, ref_cov = reference.mean(0), torch.cov(reference.T)
    mu, std = torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([1.5, 1.0, 1.0, 0.7], dtype=torch.float64)
    exact = frechet_distance(mu, torch.diag(std**2), ref_mu, ref_cov)
    counts = (25, 50, 100, 200, 400)
    fid_at = {k: 0.0 for k in counts}
    draws = 300
    for _ in range(draws):
        fake = mu + std * torch.randn(counts[-1], 4, generator=g, dtype=torch.float64)
        for k in counts:
            fid_at[k] += frechet_distance(fake[:k].mean(0), torch.cov(fake[:k].T), ref_mu, ref_cov) / draws
    assert fid_at[25] > 1.4 * exact
    assert fid_infinity(fid_at) == pytest.approx(exact, rel=0.03)
    with pytest.raises(ValueError, match="two or more sample counts"):
        fid_infinity({25: fid_at[25]})
