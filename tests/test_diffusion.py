"""GaussianDiffusion against closed forms: the forward process, Bayes' posterior, objectives, losses, the bound."""
import math
from typing import get_args

import pytest
import torch
from torch.special import ndtr

from ddpm import GaussianDiffusion, make_betas
from ddpm.diffusion import Objective, discretized_gaussian_log_likelihood, timestep_probs
from ddpm.schedules import SCHEDULES
from oracles import GaussianOracle

SCHEDULES = sorted(SCHEDULES)


def edm_coefficients(alpha_bar, sigma_data=0.5):
    """Karras et al. 2022 table 1 in sigma = sqrt(1 - alpha_bar) / sqrt(alpha_bar), for y = x_t / sqrt(alpha_bar)."""
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_iterated_markov_chain_matches_closed_form(schedule):
    """x_t from t steps of q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s) has q(x_t | x_0)'s mean and variance (eq. 4).

    Monte Carlo with N draws per coordinate: the sample mean's standard error is sqrt(var / N) and the
    sample variance's is var * sqrt(2 / (N - 1)); both are asserted within 5 standard errors.
    """
    N, T = 20_000, 1000
    diffusion = GaussianDiffusion(make_betas(schedule, T))
    betas = make_betas(schedule, T)
    x0 = torch.tensor([-0.9, 0.4, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = x0.expand(N, -1).clone()
    checked = {1, 10, 100, 500, 1000}
    for step in range(1, T + 1):
        beta = betas[step - 1]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float32)
        if step in checked:
            t = torch.full((1,), step - 1)
            mean, var, _ = diffusion.q_mean_variance(x0.float().unsqueeze(0), t)
            mean, var = mean.squeeze(0).double(), var.item()
            assert torch.all((x.mean(0) - mean).abs() < 5 * math.sqrt(var / N)), step
            assert torch.all((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (N - 1))), step


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_is_the_closed_form(schedule):
    diffusion = GaussianDiffusion(make_betas(schedule, 1000))
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    a = torch.cumprod(1 - make_betas(schedule, 1000), 0)[t].reshape(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(diffusion.q_sample(x0, t, noise).double(), expected, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_posterior_equals_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x_0) proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means weight by precision."""
    T = 1000
    betas = make_betas(schedule, T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    diffusion = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, T, (256,), generator=g)
    x0, xt = torch.randn(256, generator=g, dtype=torch.float64), torch.randn(256, generator=g, dtype=torch.float64)
    prior_var = 1 - alphas_cumprod[t - 1]  # q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    lik_var = betas[t]  # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t), as a function of x_{t-1}
    precision = 1 / prior_var + (1 - betas[t]) / lik_var
    mean = (alphas_cumprod[t - 1].sqrt() * x0 / prior_var + (1 - betas[t]).sqrt() * xt / lik_var) / precision
    post = diffusion.q_posterior(x0.float(), xt.float(), t)
    assert torch.allclose(post.mean.double(), mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(post.variance.double(), 1 / precision, rtol=1e-4)
    assert torch.allclose(post.log_variance.double(), (1 / precision).log(), atol=1e-4)
    # at t = 0 the posterior is the point mass at x_0
    t0 = torch.zeros(4, dtype=torch.long)
    at0 = diffusion.q_posterior(x0[:4].float(), xt[:4].float(), t0)
    assert torch.allclose(at0.mean, x0[:4].float(), atol=1e-6) and bool((at0.variance == 0).all())


def test_every_objective_predicts_the_same_x0_from_the_same_oracle():
    betas = make_betas("cosine", 1000)
    mean, cov = torch.tensor([0.2, -0.1]), torch.tensor([[0.0625, 0.02], [0.02, 0.04]])
    g = torch.Generator().manual_seed(2)
    xt, t = torch.randn(64, 2, generator=g), torch.randint(0, 1000, (64,), generator=g)
    preds = []
    for objective in get_args(Objective):
        diffusion = GaussianDiffusion(betas, objective=objective)
        preds.append(diffusion.p_mean_variance(GaussianOracle(diffusion, mean, cov), xt, t, clip_denoised=False))
    for other in preds[1:]:
        assert torch.allclose(other.pred_x0, preds[0].pred_x0, atol=2e-4)
        assert torch.allclose(other.mean, preds[0].mean, atol=2e-4)


@pytest.mark.parametrize("objective", get_args(Objective))
def test_training_loss_is_the_mse_to_the_objectives_target(objective):
    betas = make_betas("linear", 1000)
    diffusion = GaussianDiffusion(betas, objective=objective)
    x0, noise = torch.randn(5, 1, 4, 4).clamp(-1, 1), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 3, 300, 700, 999])
    a = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    c_skip, c_out = edm_coefficients(a)
    y = x0 + ((1 - a) / a).sqrt() * noise  # x_t / sqrt(alpha_bar): EDM's noisy input
    edm = ((x0 - c_skip * y) / c_out).float()
    a = a.float()
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "edm": edm}[objective]
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    per_sample = diffusion.training_loss(zero, x0, t, noise, reduction="none")
    assert torch.allclose(per_sample, (target**2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert diffusion.training_loss(zero, x0, t, noise).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


@pytest.mark.parametrize("objective", get_args(Objective))
def test_min_snr_gamma_weights(objective):
    """Hang et al. 2023: the x0-space weight min(SNR, gamma), expressed for each objective's MSE."""
    betas = make_betas("linear", 1000)
    diffusion = GaussianDiffusion(betas, objective=objective, min_snr_gamma=5.0)
    t = torch.tensor([0, 50, 200, 999])
    a = torch.cumprod(1 - betas, 0)[t]
    snr = a / (1 - a)
    x0_weight = snr.clamp(max=5.0)
    c_out = edm_coefficients(a)[1]
    expected = {"eps": x0_weight / snr, "x0": x0_weight, "v": x0_weight / (snr + 1), "edm": x0_weight * c_out**2}[objective]
    assert torch.allclose(diffusion.loss_weight(t).double(), expected, rtol=1e-4)


def test_edm_preconditioning_with_unit_sigma_data_is_v_prediction():
    """With sigma_data = 1, c_in = 1, c_skip = sqrt(alpha_bar), c_out = sqrt(1 - alpha_bar): x_0 = sqrt(a) x_t - sqrt(1 - a) v,
    so EDM's F is -v, and a net trained for one serves the other."""
    betas = make_betas("cosine", 1000)
    edm, v = GaussianDiffusion(betas, objective="edm", sigma_data=1.0), GaussianDiffusion(betas, objective="v")
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.rand(6, 3, generator=g) * 2 - 1, torch.randn(6, 3, generator=g), torch.tensor([0, 1, 10, 400, 900, 999])
    assert torch.allclose(edm.target(x0, t, noise), -v.target(x0, t, noise), atol=1e-5)
    seen = []
    net = lambda x, t: seen.append(x) or torch.zeros_like(x)  # noqa: E731
    xt = edm.q_sample(x0, t, noise)
    edm.model_output(net, xt, t)
    assert torch.allclose(seen[0], xt, atol=1e-6)
    out = torch.randn(6, 3, generator=g)
    assert torch.allclose(edm.predict_x0(xt, t, -out), v.predict_x0(xt, t, out), atol=1e-5)


def test_edm_network_input_has_unit_variance_for_data_of_sigma_data():
    """c_in x_t has variance 1 at every t when the data's standard deviation is sigma_data (Karras et al. 2022, B.6)."""
    diffusion = GaussianDiffusion(make_betas("linear", 1000), objective="edm", sigma_data=0.3)
    g = torch.Generator().manual_seed(1)
    x0 = 0.3 * torch.randn(40_000, 1, generator=g)
    for step in (0, 100, 500, 999):
        t = torch.full((len(x0),), step)
        seen = []
        diffusion.model_output(lambda x, t: seen.append(x) or x, diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g)), t)
        assert seen[0].var().item() == pytest.approx(1.0, abs=0.03)  # 5 standard errors sqrt(2 / N) = 0.035


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lognormal_timesteps_follow_karras_log_normal_over_sigma(schedule):
    """Draws of ln sigma ~ N(-1.2, 1.2^2), each snapped to the t of nearest ln sigma_t, have timestep_probs' frequencies
    (within 5 binomial standard errors plus 2 counts, for the tail bins that expect far less than one draw),
    and sample_timesteps draws from them."""
    T, N = 1000, 400_000
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, T), 0)
    probs = timestep_probs(alphas_cumprod, "lognormal", -1.2, 1.2)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12) and bool((probs > 0).all())
    log_sigma = 0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()
    g = torch.Generator().manual_seed(2)
    draws = -1.2 + 1.2 * torch.randn(N, generator=g, dtype=torch.float64)
    snapped = torch.bucketize(draws, (log_sigma[1:] + log_sigma[:-1]) / 2)  # log sigma_t rises with t
    freq = torch.bincount(snapped, minlength=T).double() / N
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / N).sqrt() + 2 / N)
    diffusion = GaussianDiffusion(make_betas(schedule, T), timestep_sampling="lognormal")
    t = diffusion.sample_timesteps(N, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(t, minlength=T).double() / N
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / N).sqrt() + 2 / N)
    # half the mass lies below sigma = e^-1.2, i.e. at t where log sigma_t < -1.2
    assert probs[log_sigma < -1.2].sum().item() == pytest.approx(0.5, abs=0.02)


def test_hybrid_loss_stays_an_unbiased_estimate_of_l_vlb_under_lognormal_timesteps():
    """E_{t ~ p}[lambda T w_t L_t] with w_t = 1 / (T p_t) equals uniform t's E[lambda T L_t]: the L_vlb part of the loss
    summed over all t, weighted by p_t, is the uniform process's mean over t."""
    betas = make_betas("linear", 200)
    uniform = GaussianDiffusion(betas, variance="learned_range")
    lognormal = GaussianDiffusion(betas, variance="learned_range", timestep_sampling="lognormal")
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.rand(1, 1, 2, 2, generator=g) * 2 - 1, torch.randn(1, 1, 2, 2, generator=g)
    t = torch.arange(200)
    x0, noise = x0.expand(200, -1, -1, -1), noise.expand(200, -1, -1, -1)
    net = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, 0.3)], dim=1)  # noqa: E731
    mse = (noise**2).mean(dim=(1, 2, 3))  # L_simple of the zero eps prediction, the same for both
    vlb_uniform = uniform.training_loss(net, x0, t, noise, reduction="none") - mse
    vlb_lognormal = lognormal.training_loss(net, x0, t, noise, reduction="none") - mse
    p = lognormal.timestep_probs.double()
    assert (p * vlb_lognormal.double()).sum().item() == pytest.approx(vlb_uniform.double().mean().item(), rel=1e-4)
    assert not torch.allclose(vlb_lognormal, vlb_uniform)  # the weights do differ per t


def test_bad_options_are_rejected_with_the_accepted_values():
    betas = make_betas("linear", 10)
    with pytest.raises(ValueError, match="objective must be one of eps, x0, v"):
        GaussianDiffusion(betas, objective="score")
    with pytest.raises(ValueError, match="variance must be one of fixed_small, fixed_large"):
        GaussianDiffusion(betas, variance="learned")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(betas, min_snr_gamma=0.0)


def test_discretized_gaussian_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.01)), (-0.3, math.log(2.0))]:
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def _gaussian_bound_closed_form(betas: torch.Tensor, mu: float, v: float, variance: str) -> float:
    """E[bound] in bits/dim for 1-D data N(mu, v) quantised to 8 bits, with the exact posterior-mean oracle.

    Linear-Gaussian algebra: x0_hat(x_t) errs by e ~ N(0, r_t^2), r_t^2 = v (1 - a_t) / (a_t v + 1 - a_t), plus
    the quantisation's Delta^2 / 12 (the oracle treats the data as continuous). Then
    E[L_{t-1}] = 1/2 [log(s_t^2 / bt_t) + bt_t / s_t^2 + c1_t^2 r_t^2 / s_t^2 - 1] (bt_t: posterior variance, s_t^2: the
    reverse variance, c1_t: posterior_mean_coef1), and E[L_0] = E_e[-log P(bin | N(e, bt_1))] by quadrature.
    The prior term is about 1e-5 bits and is left out.
    """
    b = betas.double()
    a_all = torch.cumprod(1 - b, 0)
    a_prev_all = torch.cat([torch.ones(1, dtype=torch.float64), a_all[:-1]])
    post = b * (1 - a_prev_all) / (1 - a_all)
    quantisation = (2 / 255) ** 2 / 12
    r2 = v * (1 - a_all) / (a_all * v + 1 - a_all) + quantisation
    t = torch.arange(1, len(b))
    c1 = a_prev_all[t].sqrt() * b[t] / (1 - a_all[t])
    s2 = post[t] if variance == "fixed_small" else b[t]
    kl = 0.5 * ((s2 / post[t]).log() + post[t] / s2 + c1**2 * r2[t] / s2 - 1)
    e = torch.linspace(-8, 8, 20001, dtype=torch.float64) * r2[0].sqrt()
    w = torch.exp(-(e**2) / (2 * r2[0]))
    w = w / w.sum()
    sd = post[1].sqrt()
    decoder = -(w * (ndtr((1 / 255 - e) / sd) - ndtr((-1 / 255 - e) / sd)).clamp(min=1e-300).log()).sum()
    return float((kl.sum() + decoder) / math.log(2))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bits_per_dim_of_the_oracle_bounds_the_true_nll_by_the_derived_margin(variance):
    """For N(0.2, 0.25^2) data in 8 bits: the bound is >= the data's exact discrete NLL (Gibbs + ELBO),
    and equals its closed-form expectation (above) within Monte Carlo error.

    Tolerances: 4 standard errors of the per-sample mean (the same samples give both sides, so the NLL's
    and the bound's errors largely cancel in the gap), plus 0.03 bits for the closed form's continuous
    approximation of the quantised data.
    """
    mu, sd, N, D = 0.2, 0.25, 400, 4
    betas = make_betas("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x = (mu + sd * torch.randn(N, D, generator=g, dtype=torch.float64)).clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), x - 1 / 255)
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), x + 1 / 255)
    nll = -(ndtr((upper - mu) / sd) - ndtr((lower - mu) / sd)).log2().mean(1)  # exact bits/dim per sample
    diffusion = GaussianDiffusion(betas, variance=variance)
    oracle = GaussianOracle(diffusion, torch.full((D,), mu), torch.eye(D) * sd**2)
    result = diffusion.bits_per_dim(oracle, x.float(), generator=torch.Generator().manual_seed(1))
    bpd = result.total.double()
    assert torch.allclose(result.total, result.prior + result.kl.sum(1) + result.decoder, atol=1e-4)
    gap = bpd - nll
    se = gap.std().item() / math.sqrt(N)
    assert gap.mean().item() > -3 * se
    expected = _gaussian_bound_closed_form(betas, mu, sd**2, variance)
    assert abs(bpd.mean().item() - expected) < 4 * bpd.std().item() / math.sqrt(N) + 0.03
    assert expected - nll.mean().item() < (1.0 if variance == "fixed_small" else 0.3)  # the margin, derived above


def test_bits_per_dim_quick_estimate_is_unbiased():
    """The stratified K-term estimate averages to the full-T value (10 independent draws, 4 standard errors)."""
    mu, sd, D = 0.2, 0.25, 4
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    oracle = GaussianOracle(diffusion, torch.full((D,), mu), torch.eye(D) * sd**2)
    x = (mu + sd * torch.randn(200, D, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    full = diffusion.bits_per_dim(oracle, x, generator=torch.Generator().manual_seed(1)).total.mean().item()
    quick = torch.tensor(
        [diffusion.bits_per_dim(oracle, x, num_timesteps=100, generator=torch.Generator().manual_seed(s)).total.mean().item() for s in range(10)]
    )
    assert abs(quick.mean().item() - full) < 4 * quick.std().item() / math.sqrt(10) + 0.02


class LearnedVarianceOracle:
    """The Gaussian oracle's mean output plus, per t, the bound-optimal variance as learned_range's v in [-1, 1].

    For Gaussian data E[L_{t-1}] is minimised by s_t^2 = bt_t + c1_t^2 r_t^2 (setting the derivative of the
    closed form in _gaussian_bound_closed_form to zero); it is clipped to the learnable range [bt_t, beta_t].
    """

    def __init__(self, diffusion: GaussianDiffusion, mu: float, v: float, D: int):
        self.mean_oracle = GaussianOracle(diffusion, torch.full((D,), mu), torch.eye(D) * v)
        b = diffusion.betas.double()
        a = torch.cumprod(1 - b, 0)
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        r2 = v * (1 - a) / (a * v + 1 - a) + (2 / 255) ** 2 / 12
        c1 = a_prev.sqrt() * b / (1 - a)
        log_small, log_large = diffusion.posterior_log_variance_clipped.double(), b.log()
        best = (log_small.exp() + c1**2 * r2).log()
        self.v = (2 * ((best - log_small) / (log_large - log_small)).clamp(0, 1) - 1).float()

    def __call__(self, xt, t):
        return torch.cat([self.mean_oracle(xt, t), self.v[t].reshape(-1, 1).expand_as(xt)], dim=1)


def test_learned_variance_with_the_optimal_interpolation_is_no_worse_than_fixed():
    """Nichol & Dhariwal 2021: a learned variance in [beta-tilde, beta] can only tighten the bound. The same
    x and noise draws feed all three, so the comparison is paired; tolerance 0.02 bits."""
    mu, sd, D = 0.2, 0.25, 4
    betas = make_betas("linear", 1000)
    x = (mu + sd * torch.randn(300, D, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    bpd = {}
    for variance in ["fixed_small", "fixed_large", "learned_range"]:
        diffusion = GaussianDiffusion(betas, variance=variance)
        model = LearnedVarianceOracle(diffusion, mu, sd**2, D) if variance == "learned_range" else GaussianOracle(diffusion, torch.full((D,), mu), torch.eye(D) * sd**2)
        bpd[variance] = diffusion.bits_per_dim(model, x, generator=torch.Generator().manual_seed(1)).total.mean().item()
    assert bpd["learned_range"] <= min(bpd["fixed_small"], bpd["fixed_large"]) + 0.02


def test_hybrid_loss_trains_a_tiny_unet_without_nan():
    from ddpm import UNet
    from ddpm.data import digits_split

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_betas("cosine", 1000), variance="learned_range")
    net = UNet(image_size=8, in_channels=1, out_channels=diffusion.model_channels(1), base_channels=16,
               channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=8)
    images, _ = digits_split("train")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t = torch.randint(0, 1000, (64,))
    losses = []
    for step in range(60):
        x0 = images[torch.randint(0, len(images), (64,))]
        loss = diffusion.training_loss(net, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    with torch.no_grad():
        held = diffusion.training_loss(net, images[:64], t=t, noise=torch.randn(64, 1, 8, 8))
    assert math.isfinite(held.item())


def test_hybrid_loss_trains_only_the_variance_through_the_vlb_term():
    """Nichol & Dhariwal 2021 sec. 3.1: in L_hybrid = L_simple + lambda * T * L_vlb the mean's output is detached
    in the L_vlb term. The gradient on the mean half of the network output is the same for lambda = 0 and a large
    lambda (L_vlb adds nothing to it); the variance half gets a gradient only from L_vlb, so only when lambda > 0."""
    betas = make_betas("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(4, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 40, 99])  # the decoder term (t = 0) and KL terms
    output = torch.randn(4, 4, 4, 4, generator=gen) * 0.5  # [mean half | variance half], as the network returns

    def gradient(vlb_weight: float) -> torch.Tensor:
        diffusion = GaussianDiffusion(betas, variance="learned_range", vlb_weight=vlb_weight)
        leaf = output.clone().requires_grad_(True)
        diffusion.training_loss(lambda x, t: leaf, x0, t, noise).backward()
        return leaf.grad

    without, weighted = gradient(0.0), gradient(10.0)
    mean_without, var_without = without.chunk(2, dim=1)
    mean_weighted, var_weighted = weighted.chunk(2, dim=1)
    torch.testing.assert_close(mean_weighted, mean_without, rtol=0, atol=1e-9)
    assert mean_without.abs().min() > 0  # L_simple reaches every element of the mean half
    assert torch.count_nonzero(var_without) == 0
    assert bool((var_weighted.abs().amax(dim=(1, 2, 3)) > 0).all())  # every sample, t = 0 included
