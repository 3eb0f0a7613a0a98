"""Classifier-free guidance: the combination rule and its end points (Ho & Salimans 2022); a briefly trained
conditional model generates the requested digit, and without labels inpaints a digit keeping its class."""
import pytest
import torch

from ddpm import GaussianDiffusion, UNet, make_betas
from ddpm.guidance import ClassifierFreeGuidance


def conditional_net(out_channels=None):
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, out_channels=out_channels, base_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=8, num_classes=10).eval()
    with torch.no_grad():  # the paper's init zeroes the output layers: perturb so outputs depend on the label
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_guidance_is_the_linear_combination_of_conditional_and_unconditional_outputs():
    net = conditional_net()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full_like(y, 10))
        for s in (0.0, 1.0, 3.0):
            guided = ClassifierFreeGuidance(net, s, null_label=10)(x, t, y)
            assert torch.allclose(guided, uncond + s * (cond - uncond), atol=1e-5)


def test_scale_zero_samples_exactly_as_the_unconditional_model():
    net = conditional_net()
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    y = torch.tensor([1, 2, 3, 4])
    guided = diffusion.sample(ClassifierFreeGuidance(net, 0.0, null_label=10), (4, 1, 8, 8), steps=10,
                              generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    unconditional = diffusion.sample(net, (4, 1, 8, 8), steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(guided, unconditional, atol=1e-6)


def test_learned_variance_channels_are_not_guided():
    net = conditional_net(out_channels=2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 5, 8])
    with torch.no_grad():
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full_like(y, 10))
        guided = ClassifierFreeGuidance(net, 2.0, null_label=10, guided_channels=1)(x, t, y)
    assert torch.allclose(guided[:, :1], uncond[:, :1] + 2.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5)
    assert torch.allclose(guided[:, 1:], cond[:, 1:], atol=1e-6)


@pytest.fixture(scope="module")
def briefly_trained() -> tuple[GaussianDiffusion, UNet]:
    """A tiny conditional UNet trained 300 steps with 20% label dropout on the digits train split (T = 200, cosine)."""
    from ddpm.data import digits_split

    torch.manual_seed(0)
    images, labels = digits_split("train")
    diffusion = GaussianDiffusion(make_betas("cosine", 200))
    net = UNet(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, norm_groups=8, num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(300):
        idx = torch.randint(0, len(images), (128,))
        y = torch.where(torch.rand(128) < 0.2, torch.full((128,), 10), labels[idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion.training_loss(net, images[idx], model_kwargs={"y": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return diffusion, net.eval()


def test_briefly_trained_conditional_model_generates_the_requested_digit(briefly_trained):
    """The model of `briefly_trained` sampled with DDIM-20:
    the digits classifier agrees with the requested label far above chance (10%), more so with guidance,
    and at scale 0 (unconditional) no better than chance allows (measured: about 0.09, 0.8, 0.99)."""
    from ddpm.digits_classifier import load_digits_classifier

    diffusion, net = briefly_trained
    classifier = load_digits_classifier()
    wanted = torch.arange(200) % 10
    accuracy = {}
    for scale in (0.0, 1.0, 3.0):
        x = diffusion.sample(ClassifierFreeGuidance(net, scale, null_label=10), (200, 1, 8, 8), sampler="ddim", steps=20,
                             generator=torch.Generator().manual_seed(0), model_kwargs={"y": wanted})
        with torch.no_grad():
            accuracy[scale] = (classifier(x).argmax(1) == wanted).float().mean().item()
    assert accuracy[0.0] < 0.2  # chance is 0.1; 0.2 is 4.7 binomial standard errors above it at n = 200
    assert accuracy[1.0] > 0.4
    assert accuracy[3.0] > max(0.8, accuracy[1.0])


def test_inpainting_the_right_half_keeps_the_digit(briefly_trained):
    """The same model without labels (its null label: unconditional) regenerates the right half of 100 val digits
    from their left half (ancestral sampling over 50 respaced steps): the classifier still reads the original digit
    far above chance (0.1; measured 0.57), and RePaint's resampling (U = 5; measured 0.64) keeps it at least as
    often, within the draw's noise."""
    from ddpm.data import digits_split
    from ddpm.digits_classifier import load_digits_classifier

    diffusion, net = briefly_trained
    images, labels = digits_split("val")
    images, labels = images[:100], labels[:100]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    classifier = load_digits_classifier()
    kept = {}
    for resample in (1, 5):
        x = diffusion.sample(net, images.shape, sampler="ddpm", steps=50, generator=torch.Generator().manual_seed(0), x_init=images,
                             mask=mask, model_kwargs={"y": torch.full((100,), 10)}, sampler_options={"resample": resample})  # fmt: skip
        assert torch.equal(x[..., :4], images[..., :4])
        with torch.no_grad():
            kept[resample] = (classifier(x).argmax(1) == labels).float().mean().item()
    assert kept[1] > 0.35 and kept[5] > kept[1] - 0.07, kept  # 0.35: 8 binomial standard errors above chance at n = 100
