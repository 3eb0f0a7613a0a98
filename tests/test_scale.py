"""Speed and scale: fused Adam, channels_last, bf16, activation checkpointing, gradient accumulation, DDP against
one process, torch.compile, FSDP's refusal of EMA, and sweeps through the submitit launcher.

Trainer-level tests fit a DiffusionModule on the first 16 digits in a fixed order (shuffle off), so the same
global batch can be fed whole, as accumulated halves, or split over two DDP processes. The module draws t and
noise per optimizer step, row by row from seeded streams, and hands each rank and micro-batch its rows
(`DiffusionModule.training_draws`), so every split sees the same (image, t, noise) triples and the runs can be
compared weight for weight.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from conftest import ROOT, train
from ddpm.callbacks import EMA
from ddpm.errors import ConfigError
from ddpm.data import digits_split
from ddpm.module import DiffusionModule
from ddpm.unet import UNet

TINY = dict(image_size=8, in_channels=1, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], dropout=0.0, norm_groups=8)  # fmt: skip


def perturb(module: DiffusionModule, seed: int = 0) -> DiffusionModule:
    """Noise on every UNet weight: the paper's zero init makes the first output exactly 0, which would hide any
    difference in the forward pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def make_module(**kwargs) -> DiffusionModule:
    """A tiny DiffusionModule (T = 100, lr 1e-3, no warm-up, no grids), the same weights for the same kwargs."""
    torch.manual_seed(0)
    module = DiffusionModule(unet=TINY, timesteps=100, warmup_steps=0, sample_every_n_steps=0, lr=1e-3, **kwargs)
    return perturb(module)


def loader(batch_size: int, distributed_order: bool = False) -> DataLoader:
    """The first 16 training digits, two global batches of 8 per epoch: in a fixed order, or (distributed_order)
    in the order a DDP world reads them, DistributedSampler's seeded permutation, here for one process."""
    x, y = digits_split("train")
    data = TensorDataset(x[:16], y[:16])
    if distributed_order:
        return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=0))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class LossRecorder(pl.Callback):
    """The loss of every micro-batch, as training_step returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(
    module: DiffusionModule, root: Path, batch_size: int = 8, steps: int = 3, distributed_order: bool = False, **trainer_kwargs
) -> pl.Trainer:
    """`steps` optimizer steps on the CPU, seed 0, gradient clipping at 1 as in conf/train.yaml."""
    pl.seed_everything(0, verbose=False)
    kwargs = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                  default_root_dir=root) | trainer_kwargs  # fmt: skip
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, train_dataloaders=loader(batch_size, distributed_order))
    return trainer


def update_difference(a: DiffusionModule, b: DiffusionModule) -> float:
    """|| (w_a - w_0) - (w_b - w_0) || / || w_a - w_0 ||: how far two runs' weight updates from the common init
    w_0 = make_module() differ, relative to the update itself.

    A relative norm, not a largest difference: the key biases of attention get an identically zero gradient
    (softmax ignores a shift shared by all keys), so theirs is float rounding only, which Adam's division by
    sqrt(v) + eps turns into steps of up to ~lr in either direction.
    """
    init = [p.detach().flatten() for p in make_module().unet.parameters()]
    update_a = torch.cat([p.detach().flatten() - w for p, w in zip(a.unet.parameters(), init)])
    update_b = torch.cat([p.detach().flatten() - w for p, w in zip(b.unet.parameters(), init)])
    return ((update_a - update_b).norm() / update_a.norm()).item()


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ---- optimizer, memory format, precision ---------------------------------------------------------------


def test_fused_adam_channels_last_and_fp32_ema(tmp_path: Path) -> None:
    """fp32 and bf16-mixed with clipping: torch's fused Adam (under bf16 the module clips, as Lightning's AMP plugin
    refuses fused optimizers). NHWC conv weights and batches; the EMA copy of a bf16-mixed run stays fp32 and moves."""
    assert fit(make_module(), tmp_path, steps=1).optimizers[0].defaults["fused"] is True
    module, ema = make_module(), EMA(decay=0.9)
    trainer = fit(module, tmp_path, steps=2, precision="bf16-mixed", callbacks=[ema])
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    convs = [p for p in module.unet.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    rgb = (torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    x = module.on_after_batch_transfer(rgb, 0)[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    averaged = list(ema.averaged_module.unet.parameters())
    assert all(p.dtype == torch.float32 for p in averaged)
    assert any(not torch.equal(p, q) for p, q in zip(averaged, module.unet.parameters()))  # it did average
    off = make_module(channels_last=False)
    assert all(p.is_contiguous() for p in off.unet.parameters())
    assert off.on_after_batch_transfer(rgb, 0)[0].is_contiguous()


class GradientRecorder(pl.Callback):
    """The gradients' total norm and largest magnitude as the optimizer used them (a step post-hook: Lightning clips
    inside the optimizer's closure, so only after the step are the clipped gradients visible)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.largest: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(self.record)

    def record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.cat(grads).norm().item())
        self.largest.append(torch.cat(grads).abs().max().item())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_applies_with_the_fused_optimizer(tmp_path: Path, precision: str) -> None:
    """The fused optimizer sees clipped gradients: total norm equal to a clip value far below the raw norm (1e-4
    relative: one rescaling in fp32), or, clipping by value, no component beyond it."""
    raw, by_norm, by_value = GradientRecorder(), GradientRecorder(), GradientRecorder()
    fit(make_module(), tmp_path, steps=2, precision=precision, callbacks=[raw], gradient_clip_val=None)
    fit(make_module(), tmp_path, steps=2, precision=precision, callbacks=[by_norm], gradient_clip_val=1e-3)
    fit(make_module(), tmp_path, steps=2, precision=precision, callbacks=[by_value], gradient_clip_val=1e-5,
        gradient_clip_algorithm="value")  # fmt: skip
    assert min(raw.norms) > 1e-2 and min(raw.largest) > 1e-4  # the clip values bind
    assert len(by_norm.norms) == 2
    torch.testing.assert_close(torch.tensor(by_norm.norms), torch.full((2,), 1e-3), rtol=1e-4, atol=0)
    assert max(by_value.largest) <= 1e-5


def test_bf16_and_channels_last_losses_close_to_fp32(tmp_path: Path) -> None:
    """Two steps on the same batches with the same draws of t and noise: channels_last gives the fp32 losses to
    1e-5 (the same arithmetic in another order); bf16-mixed, in either layout, to 1%: its convolutions round inputs and weights to
    8 mantissa bits (~0.4% each), and the loss, computed in fp32 from the bf16 output, measured ~0.1% here."""
    losses = {}
    runs = (("fp32", "32-true", False), ("fp32_cl", "32-true", True), ("bf16", "bf16-mixed", False), ("bf16_cl", "bf16-mixed", True))
    for name, precision, channels_last in runs:
        recorder = LossRecorder()
        fit(make_module(channels_last=channels_last), tmp_path, steps=2, precision=precision, callbacks=[recorder])
        losses[name] = torch.tensor(recorder.losses)
    ref = losses["fp32"]
    assert ref.shape == (2,) and ref[1] != ref[0]
    torch.testing.assert_close(losses["fp32_cl"], ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["bf16"], ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(losses["bf16_cl"], ref, rtol=1e-2, atol=0)


# ---- activation checkpointing --------------------------------------------------------------------------


class LrRecorder(pl.Callback):
    """The learning rate each optimizer step ran with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("decay", ["none", "cosine", "linear"])
def test_learning_rate_warms_up_then_decays_to_zero_at_max_steps(tmp_path: Path, decay: str) -> None:
    """Warm-up (k + 1) / W for k < W, then 1, half a cosine wave, or a line, reaching 0 at max_steps (the
    last step, k = max_steps - 1, runs just above 0)."""
    recorder, W, S = LrRecorder(), 3, 11
    module = make_module(lr_decay=decay)
    module.hparams.warmup_steps = W
    fit(module, tmp_path, steps=S, callbacks=[recorder])
    progress = [(k - W) / (S - W) for k in range(W, S)]
    after = {"none": [1.0] * len(progress), "cosine": [(1 + math.cos(math.pi * p)) / 2 for p in progress],
             "linear": [1 - p for p in progress]}[decay]  # fmt: skip
    expected = [1e-3 * f for f in [(k + 1) / W for k in range(W)] + after]
    assert recorder.lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_learning_rate_decay_needs_max_steps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="module.lr_decay=cosine decays to 0 at trainer.max_steps, which is -1"):
        fit(make_module(lr_decay="cosine"), tmp_path, steps=-1, max_time="00:00:00:05")


def test_activation_checkpointing_same_gradients_less_memory() -> None:
    """model.use_checkpoint=true: the gradients equal the stored-activation ones (recomputation replays the same
    arithmetic and the dropout masks), while the autograd graph keeps less than half the activations."""
    cfg = compose_train("model=tiny", "model.use_checkpoint=true", "model.dropout=0.1", "module.channels_last=false")
    modules = []
    for use_checkpoint in (False, True):
        cfg.module.unet.use_checkpoint = use_checkpoint
        modules.append(hydra.utils.instantiate(cfg.module))
    plain, ckpt = modules
    perturb(plain)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.unet.down[0][0].use_checkpoint and not plain.unet.down[0][0].use_checkpoint
    x0 = digits_split("train")[0][:8]
    t, noise, _ = plain.training_draws(x0, 0)
    saved_bytes, grads = [], []
    for module in (plain, ckpt):
        sizes: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(1)  # the same dropout masks in both
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = module.diffusion.training_loss(module.unet, x0, t=t, noise=noise)
        loss.backward()
        saved_bytes.append(sum(sizes))
        grads.append([p.grad for p in module.unet.parameters()])
    for g_ckpt, g_plain in zip(*reversed(grads)):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-8)
    assert saved_bytes[1] < 0.5 * saved_bytes[0], saved_bytes


# ---- the same global batch, split three ways ----------------------------------------------------------


def test_training_draws_are_rows_of_the_global_batch_draw() -> None:
    """Rank r's micro-batch m under (world 2, accumulation 2, batch 2) gets exactly rows m*4 + 2i + r of the draw a
    single process makes for the whole global batch of 8 at the same step: t, noise and dropout uniforms, bit for
    bit. Another step or another initial seed draws other noise."""
    module = make_module()
    x0 = torch.zeros(8, 1, 8, 8)

    def draws(world: int, rank: int, accum: int, batch_idx: int, step: int = 5, batch: int = 8):
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=accum, global_step=step)
        return module.training_draws(x0[:batch], batch_idx)

    torch.manual_seed(7)
    t, noise, drop = draws(1, 0, 1, 0)
    for m, r in itertools.product(range(2), range(2)):
        rows = [m * 4 + 2 * i + r for i in range(2)]
        got = draws(2, r, 2, batch_idx=10 + m, batch=2)  # batch_idx counts on across steps; m = batch_idx % accum
        for full, part in zip((t, noise, drop), got):
            assert torch.equal(full[rows], part)
    assert not torch.equal(draws(1, 0, 1, 0, step=6)[1], noise)
    torch.manual_seed(8)
    assert not torch.equal(draws(1, 0, 1, 0)[1], noise)
    assert noise.std().item() == pytest.approx(1.0, abs=0.1) and len(set(t.tolist())) > 1
    module._trainer = None


def test_gradient_accumulation_equals_the_full_batch(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 over batches of 4 gives batch 8's losses and weight updates after 3 steps.

    Lightning divides each micro-batch loss by 2 and sums the gradients: the batch-8 gradient up to float
    rounding (~1e-7 relative). The updates then differ by 5e-5 relative (measured; update_difference says where
    it comes from); bound 1e-3. Another arithmetic (bf16-mixed) differs by 8e-2 here, and a mismatched draw of
    t or noise by O(1).
    """
    full, acc = LossRecorder(), LossRecorder()
    whole = make_module()
    fit(whole, tmp_path / "full", batch_size=8, callbacks=[full])
    halves = make_module()
    fit(halves, tmp_path / "acc", batch_size=4, accumulate_grad_batches=2, callbacks=[acc])
    assert len(full.losses) == 3 and len(acc.losses) == 6
    # Lightning hands on each micro-batch loss divided by 2: their sum is the mean of the 8 per-image losses
    pairs = torch.tensor(acc.losses).view(3, 2).sum(1)
    torch.testing.assert_close(pairs, torch.tensor(full.losses), rtol=1e-6, atol=0)
    assert update_difference(whole, halves) < 1e-3


class SpawnDDPClosingGroup(DDPStrategy):
    """ddp_spawn whose ranks destroy their gloo process group together, at the end of fit.

    With plain ddp_spawn, rank 1 leaves right after fit (rank 0 still saves the weights for the parent) and
    its process group is destroyed by Lightning's atexit hook during interpreter exit, while rank 0's is
    alive; about once in 30-100 runs rank 1 then aborted ("terminate called without an active exception").
    """

    def __init__(self) -> None:
        super().__init__(start_method="spawn")

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    """DDP over 2 CPU processes (gloo) with batch 4 each gives the weights of one process with batch 8.

    Lightning gives each rank a DistributedSampler (shuffled with the run's seed, 0) over the 16 images; rank r
    reads the permutation's entries r, r + 2, ..., and training_draws gives it the same rows of each step's
    draw. The single process reads the same permutation whole (DistributedSampler for one replica), so both
    runs see the same (image, t, noise) triples in every global batch. DDP averages the
    two ranks' gradients (all-reduce, then / 2) where one process sums 8 terms: float rounding alone, so the
    weight updates after 3 steps agree to the accumulation test's bound (1e-3 relative; a mismatched draw of
    t or noise gives O(1)).
    """
    single = make_module()
    fit(single, tmp_path / "single", batch_size=8, distributed_order=True)
    ddp = make_module()
    fit(ddp, tmp_path / "ddp", batch_size=4, devices=2, strategy=SpawnDDPClosingGroup())  # spawn: inside pytest
    assert update_difference(single, ddp) < 1e-3


# ---- evaluation and sample grids on every rank ---------------------------------------------------------


class FrozenWeights(pl.Callback):
    """Zero the gradients before each optimizer step: Adam then leaves every weight exactly as it was, so one process
    and a DDP world evaluate the same weights."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.zero_()


class RanksAgree(pl.Callback):
    """After the evaluation of each step (listed after it), every rank holds the same val/fid and val/bpd."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        mine = torch.stack([trainer.callback_metrics["val/fid"], trainer.callback_metrics["val/bpd"]]).double()
        everyone = trainer.strategy.all_gather(mine).reshape(-1, 2)
        assert torch.equal(everyone, mine.expand_as(everyone)), everyone


def test_evaluation_is_the_same_on_one_and_two_ranks(tmp_path: Path) -> None:
    """Evaluation splits samples and held-out images into fixed chunks with their own seeds, so one process and two
    DDP ranks (gloo, spawned) score the same samples: val/fid and val/bpd agree (the weights are frozen, so both
    evaluate the same net), with each other and with FID and bits/dim computed here chunk by chunk. Every rank holds
    the values in the step (RanksAgree). The net is class-conditional: bits/dim is scored given the val labels, and
    the value without them (the null label) differs by ~0.08 bits/dim.

    20 samples in chunks of 16 and 359 val images: in the last round rank 1 has no sample chunk and no bpd chunk,
    and the short chunks are padded for the gather."""
    from ddpm.data import ImageDataModule
    from ddpm.evaluation import build_evaluator, datamodule_images, dataset_labels
    from ddpm.metrics import heldout_bits_per_dim
    from ddpm.sample_callbacks import Evaluation

    def module() -> DiffusionModule:
        torch.manual_seed(0)
        unet = TINY | {"num_classes": 10}
        return perturb(DiffusionModule(unet=unet, timesteps=100, warmup_steps=0, sample_every_n_steps=0, lr=1e-3))

    options = dict(every_n_steps=1, n=20, metrics=["fid", "bpd"], bpd_timesteps=4, sampler="ddim", steps=3, seed=5, chunk_size=16)
    values = {}
    for name, trainer_kwargs in (("one", dict(devices=1)), ("two", dict(devices=2, strategy=SpawnDDPClosingGroup()))):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path / name,
            callbacks=[FrozenWeights(), Evaluation(**options), RanksAgree()], **trainer_kwargs,
        )  # fmt: skip
        trainer.fit(module(), datamodule=ImageDataModule("digits", batch_size=8))
        values[name] = {k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("fid", "bpd")}
    assert values["two"] == pytest.approx(values["one"], rel=1e-6, abs=0)

    # the same, chunk by chunk in this process
    net = module().eval()
    datamodule = ImageDataModule("digits", batch_size=8)
    val, train_images, dataset = datamodule_images(datamodule)
    labels = dataset_labels(datamodule.val_set)
    with torch.no_grad():
        samples = torch.cat([
            net.sample(size, "ddim", 3, seed=5 + 1 + start, labels=(torch.arange(size) + start) % 10)
            for start, size in ((0, 16), (16, 4))
        ])  # fmt: skip
        fid = build_evaluator(val, train_images, ["fid"], dataset=dataset)(samples)["fid"]
        bpd = {}
        for given in (labels, None):
            chunks = [
                heldout_bits_per_dim(
                    net.diffusion, net.unet, val[start : start + 16], batch_size=16, num_timesteps=4,
                    generator=torch.Generator().manual_seed(5 + k), labels=None if given is None else given[start : start + 16],
                ) * len(val[start : start + 16])
                for k, start in enumerate(range(0, len(val), 16))
            ]  # fmt: skip
            bpd["labels" if given is not None else "null"] = sum(chunks) / len(val)
    assert values["one"]["fid"] == pytest.approx(fid, rel=1e-6)
    assert values["one"]["bpd"] == pytest.approx(bpd["labels"], rel=1e-5)
    assert abs(bpd["labels"] - bpd["null"]) > 0.02, bpd  # scoring without the labels would fail the line above


# ---- torch.compile --------------------------------------------------------------------------------------


def test_compile_trains_end_to_end(tmp_path: Path) -> None:
    """compile=true through train.py: the compile time printed once and logged, and checkpoints as an eager
    run's. The aot_eager backend runs TorchDynamo's capture and AOTAutograd's joint graph as inductor does, but
    runs the captured ATen ops instead of generating C++ (inductor's first step takes ~70 s on this CPU), so its
    weights match an eager run of the same config to float rounding (both in fp32, where rounding is that small)."""
    fp32 = ("schedule=linear", "hardware.precision=32-true")
    out = train(tmp_path / "run", *fp32, "compile=true", "compile_options.backend=aot_eager").stdout
    assert out.count("torch.compile: ") == 1, out
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    assert "perf/compile_s" in metrics.splitlines()[0]
    train(tmp_path / "eager", *fp32)
    compiled = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    eager = torch.load(tmp_path / "eager" / "checkpoints" / "last.ckpt", weights_only=True)
    assert compiled["global_step"] == eager["global_step"] == 8
    for key in ("state_dict", "current_model_state"):
        assert compiled[key].keys() == eager[key].keys()  # nn.Module.compile: no _orig_mod prefixes
        for name, value in eager[key].items():
            torch.testing.assert_close(compiled[key][name], value, rtol=1e-4, atol=1e-5)


def test_inductor_forward_matches_eager() -> None:
    """The UNet compiled by inductor (generated C++) predicts what the eager net does, within 1e-5 (fused
    kernels sum in another order; measured ~1e-7). One level, no attention beyond the middle: ~20 s of compile."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, norm_groups=8).eval()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        expected = net(x, t)
        net.compile()
        got = net(x, t)
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compile_bad_mode_is_one_line(tmp_path: Path) -> None:
    proc = train(tmp_path / "run", "compile=true", "compile_options.mode=fastest", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "compile_options" in lines[0] and "fastest" in lines[0] and "max-autotune" in lines[0]


# ---- FSDP ---------------------------------------------------------------------------------------------


def test_fsdp_config_builds_a_sharding_strategy() -> None:
    """hardware=fsdp: Lightning's FSDPStrategy with each ResBlock and AttnBlock an FSDP unit, full checkpoints."""
    from lightning.pytorch.strategies import FSDPStrategy

    from ddpm.unet import AttnBlock, ResBlock

    strategy = hydra.utils.instantiate(compose_train("hardware=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {ResBlock, AttnBlock}


def test_fsdp_with_ema_fails_at_start(tmp_path: Path) -> None:
    """Lightning's WeightAveraging cannot average sharded weights: hardware=fsdp with the EMA callback (the
    default callbacks) stops before anything runs, with one line that says what to do."""
    proc = train(tmp_path / "run", "hardware=fsdp", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "hardware=fsdp" in lines[0] and "~callbacks.ema" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


# ---- sweeps through submitit -----------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e .[submitit]; make install does)",
)
def test_submitit_local_sweep_runs_both_jobs(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local: each job of `-m schedule=linear,cosine` runs as its own submitit process
    and writes its run dir, config and last.ckpt under the sweep dir."""
    from conftest import run_script

    sweep = tmp_path / "sweep"
    run_script(
        "train.py", "-m", "hydra/launcher=submitit_local", "debug=fast", "schedule=linear,cosine",
        f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
    )  # fmt: skip
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 8 and ckpt["hyper_parameters"]["schedule"] == schedule
        assert f"name: {schedule}" in (sweep / job / ".hydra" / "config.yaml").read_text()
    logs = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(logs) == 2, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
