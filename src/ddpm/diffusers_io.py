"""Weights from and to diffusers: a `UNet2DModel` folder (config.json, diffusion_pytorch_model.safetensors or .bin,
scheduler_config.json, as `save_pretrained` writes them, e.g. a local copy of google/ddpm-cifar10-32) becomes a
DiffusionModule with the same network and process, and a DiffusionModule becomes such a folder.

    python -m ddpm.convert import path/to/ddpm-cifar10-32 converted.ckpt   # a native checkpoint
    python -m ddpm.convert export outputs/runs/demo exported/               # a diffusers folder

Nothing is downloaded. Weights are read with safetensors, or torch.load(weights_only=True) for a .bin, never by
unpickling arbitrary objects. A config that this UNet cannot express is refused in one line naming its key.
The layouts map one to one: the paper's UNet in diffusers' blocks (DownBlock2D / AttnDownBlock2D, UpBlock2D /
AttnUpBlock2D, UNetMidBlock2D) with diffusers' time-embedding, GroupNorm-epsilon and downsample-padding choices
(UNet's embed_cos_first, embed_freq_shift, norm_eps, downsample_padding).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ddpm.errors import ConfigError, first_line
from ddpm.unet import GeometryError, check_geometry, unet_arguments

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG, SCHEDULER = "config.json", "scheduler_config.json"
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
# diffusers config keys that must hold these values (what this UNet is), with the value when the key is absent
FIXED = {"act_fn": "silu", "time_embedding_type": "positional", "center_input_sample": False, "mid_block_scale_factor": 1,
         "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "time_embedding_dim": None,
         "mid_block_type": "UNetMidBlock2D", "attn_norm_num_groups": None, "num_train_timesteps": None}  # fmt: skip
# ddpm.UNet's arguments as check_geometry's messages show them: by the config.json keys they come from
AS_DIFFUSERS = {"image_size": "sample_size", "base_channels": "block_out_channels[0]", "channel_mult": "block_out_channels / block_out_channels[0]",
                "num_res_blocks": "layers_per_block", "attention_resolutions": "down_block_types", "norm_groups": "norm_num_groups",
                "num_classes": "num_class_embeds", "num_heads": "attention_head_dim", "embed_freq_shift": "freq_shift"}  # fmt: skip


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder holding a diffusers config.json."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


# ---- configs ------------------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(config: dict[str, Any], key: str, default: Any, where: str, ok: Callable[[Any], bool], accepted: str) -> Any:
    """config[key] (or `default`), refused in one line naming the file and the key unless ok(value)."""
    value = config.get(key, default)
    if not ok(value):
        raise ConfigError(f"{where}: {key}={json.dumps(value)} is invalid; expected {accepted}")
    return value


def unet_kwargs(config: dict[str, Any], where: str) -> dict[str, Any]:
    """ddpm.UNet's arguments for a diffusers UNet2DModel config; ConfigError naming the first key it cannot express:
    a value of the wrong type or out of range (a width, size or count that is not an integer >= 1, say), a layout
    this UNet does not have, or arguments the UNet cannot build (its own rule, ddpm.unet.check_geometry)."""

    def refuse(key: str, accepted: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={json.dumps(config.get(key))} cannot be expressed by this UNet; expected {accepted}")

    def count(key: str, default: int, accepted: str = "an integer >= 1") -> int:
        return _typed(config, key, default, where, _is_count, accepted)

    for key, value in FIXED.items():
        if config.get(key, value) != value:
            raise refuse(key, json.dumps(value))
    channels = config.get("block_out_channels")
    if not (isinstance(channels, list) and channels and all(_is_count(c) for c in channels)) or any(c % channels[0] for c in channels):
        raise refuse("block_out_channels", "a non-empty list of integers >= 1, each a multiple of the first")
    base = channels[0]
    down, up = config.get("down_block_types"), config.get("up_block_types")
    if not isinstance(down, list) or len(down) != len(channels) or any(b not in (DOWN, ATTN_DOWN) for b in down):
        raise refuse("down_block_types", f"one {DOWN} or {ATTN_DOWN} per width")
    mirror = [ATTN_UP if b == ATTN_DOWN else UP for b in reversed(down)]
    if up != mirror:
        raise refuse("up_block_types", f"the mirror of down_block_types: {json.dumps(mirror)}")
    size = count("sample_size", 32, "an integer >= 1 (square images)")
    head_dim = _typed(config, "attention_head_dim", None, where, lambda v: v is None or _is_count(v), "null or an integer >= 1")
    attended = [c for c, b in zip(channels, down) if b == ATTN_DOWN] + [channels[-1]]
    heads = 1 if head_dim is None else attended[0] // head_dim
    if head_dim is not None and any(c != heads * head_dim for c in attended):
        raise refuse("attention_head_dim", "null (one head per attention block) or a width over a head count shared by every attention block")
    if config.get("freq_shift", 0) not in (0, 1):
        raise refuse("freq_shift", "0 or 1")
    if config.get("downsample_padding", 1) not in (0, 1):
        raise refuse("downsample_padding", "0 or 1")
    if config.get("downsample_type", "conv") != "conv" or config.get("upsample_type", "conv") != "conv":
        raise refuse("downsample_type" if config.get("downsample_type", "conv") != "conv" else "upsample_type", '"conv"')
    # diffusers counts the unconditional class among its embeddings: this UNet's num_classes is one less
    classes = _typed(config, "num_class_embeds", None, where, lambda v: v is None or (_is_count(v) and v >= 2), "null or an integer >= 2")
    flip = _typed(config, "flip_sin_to_cos", True, where, lambda v: isinstance(v, bool), "true or false")
    kwargs = {
        "image_size": size, "in_channels": count("in_channels", 3), "out_channels": count("out_channels", 3),
        "base_channels": base, "channel_mult": [c // base for c in channels], "num_res_blocks": count("layers_per_block", 2),
        "attention_resolutions": [size // 2**i for i, b in enumerate(down) if b == ATTN_DOWN],
        "dropout": float(_typed(config, "dropout", 0.0, where, _is_number, "a number in [0, 1)")),
        "norm_groups": count("norm_num_groups", 32), "num_classes": None if classes is None else classes - 1, "num_heads": heads,
        "norm_eps": float(_typed(config, "norm_eps", 1e-5, where, _is_number, "a number > 0")), "embed_cos_first": flip,
        "embed_freq_shift": int(config.get("freq_shift", 0)), "downsample_padding": int(config.get("downsample_padding", 1)),
    }  # fmt: skip
    try:
        check_geometry(**{k: v for k, v in kwargs.items() if k != "embed_cos_first"}, names=lambda arg: AS_DIFFUSERS.get(arg, arg))
    except GeometryError as e:  # e.arg shows the argument by its config key, first word (block_out_channels[0] -> block_out_channels)
        raise refuse(re.match(r"\w+", e.arg).group(), e.accepted) from None
    return kwargs


def diffusers_config(unet: dict[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config of ddpm.UNet arguments `unet` (the inverse of unet_kwargs)."""
    args = unet_arguments(unet)
    base, mult = int(args["base_channels"]), [int(m) for m in args["channel_mult"]]
    size = int(args["image_size"])
    down = [ATTN_DOWN if size // 2**i in args["attention_resolutions"] else DOWN for i in range(len(mult))]
    attended = [base * m for m, b in zip(mult, down) if b == ATTN_DOWN] + [base * mult[-1]]
    heads = int(args["num_heads"])
    return {
        "_class_name": "UNet2DModel", "sample_size": size, "in_channels": int(args["in_channels"]),
        "out_channels": int(args["out_channels"] if args["out_channels"] is not None else args["in_channels"]),
        "block_out_channels": [base * m for m in mult], "layers_per_block": int(args["num_res_blocks"]),
        "down_block_types": down, "up_block_types": [ATTN_UP if b == ATTN_DOWN else UP for b in reversed(down)],
        "attention_head_dim": None if heads == 1 else attended[0] // heads, "dropout": float(args["dropout"]),
        "norm_num_groups": int(args["norm_groups"]), "norm_eps": float(args["norm_eps"]), "act_fn": "silu",
        "flip_sin_to_cos": bool(args["embed_cos_first"]), "freq_shift": int(args["embed_freq_shift"]),
        "downsample_padding": int(args["downsample_padding"]), "time_embedding_type": "positional",
        "center_input_sample": False, "mid_block_scale_factor": 1,
        "num_class_embeds": None if args["num_classes"] is None else int(args["num_classes"]) + 1,
    }  # fmt: skip


def process_kwargs(scheduler: dict[str, Any], where: str) -> dict[str, Any]:
    """DiffusionModule's schedule, timesteps, objective and variance for a diffusers DDPMScheduler config; the
    betas must be this project's schedule of that name (checked to 1e-6), else ConfigError naming the key."""
    from ddpm.schedules import make_betas

    T = _typed(scheduler, "num_train_timesteps", 1000, where, _is_count, "an integer >= 1")
    name = scheduler.get("beta_schedule", "linear")
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ConfigError(f"{where}: beta_schedule={json.dumps(name)} is not one of this project's schedules; expected {' or '.join(SCHEDULES)}")
    ours = make_betas(SCHEDULES[name], T)
    if name == "linear":
        start, end = (float(_typed(scheduler, key, default, where, _is_number, "a number")) for key, default in (("beta_start", 1e-4), ("beta_end", 0.02)))
        if abs(start - float(ours[0])) > 1e-6 or abs(end - float(ours[-1])) > 1e-6:
            raise ConfigError(f"{where}: beta_start={start}, beta_end={end} differ from this project's linear schedule at T={T} "
                              f"({float(ours[0]):.6g} to {float(ours[-1]):.6g})")  # fmt: skip
    for key, table in (("prediction_type", OBJECTIVES), ("variance_type", VARIANCES)):
        value = scheduler.get(key, "epsilon" if key == "prediction_type" else "fixed_small")
        if not isinstance(value, str) or value not in table:
            raise ConfigError(f"{where}: {key}={json.dumps(value)} is not supported; expected {' | '.join(table)}")
    return {"schedule": SCHEDULES[name], "timesteps": T, "objective": OBJECTIVES[scheduler.get("prediction_type", "epsilon")],
            "variance": VARIANCES[scheduler.get("variance_type", "fixed_small")]}  # fmt: skip


def scheduler_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """The DDPMScheduler config of a DiffusionModule's hyperparameters (the inverse of process_kwargs)."""
    from ddpm.schedules import make_betas

    T, schedule = int(hparams["timesteps"]), hparams["schedule"]
    if schedule not in SCHEDULES.values():
        raise ConfigError(f"schedule={schedule} has no diffusers beta_schedule; exportable: {', '.join(SCHEDULES.values())}")
    betas = make_betas(schedule, T)
    return {
        "_class_name": "DDPMScheduler", "num_train_timesteps": T,
        "beta_schedule": {v: k for k, v in SCHEDULES.items()}[schedule], "beta_start": float(betas[0]), "beta_end": float(betas[-1]),
        "prediction_type": {v: k for k, v in OBJECTIVES.items()}[hparams.get("objective", "eps")],
        "variance_type": hparams.get("variance", "fixed_small"), "clip_sample": True,
    }  # fmt: skip


# ---- weights ------------------------------------------------------------------------------------


def module_pairs(unet: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(our module prefix, diffusers module prefix, kind) for every layer of the UNet with arguments `unet`;
    kind: "plain" (same tensors), "res" (a residual block), "attn" (an attention block)."""
    args = unet_arguments(unet)
    mult, blocks, size = list(args["channel_mult"]), int(args["num_res_blocks"]), int(args["image_size"])
    yield "time_embed.0", "time_embedding.linear_1", "plain"
    yield "time_embed.2", "time_embedding.linear_2", "plain"
    if args["num_classes"] is not None:
        yield "class_embed", "class_embedding", "plain"
    yield "conv_in", "conv_in", "plain"
    k = 0
    for level in range(len(mult)):
        attention = size // 2**level in args["attention_resolutions"]
        for j in range(blocks):
            yield f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"
            if attention:
                yield f"down.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"
            k += 1
        if level != len(mult) - 1:
            yield f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"
            k += 1
    yield "mid.0", "mid_block.resnets.0", "res"
    yield "mid.1", "mid_block.attentions.0", "attn"
    yield "mid.2", "mid_block.resnets.1", "res"
    k = 0
    for u, level in enumerate(reversed(range(len(mult)))):
        attention = size // 2**level in args["attention_resolutions"]
        for i in range(blocks + 1):
            yield f"up.{k}.0", f"up_blocks.{u}.resnets.{i}", "res"
            if attention:
                yield f"up.{k}.1", f"up_blocks.{u}.attentions.{i}", "attn"
            if level != 0 and i == blocks:
                yield f"up.{k}.{2 if attention else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv", "plain"
            k += 1
    yield "norm_out", "conv_norm_out", "plain"
    yield "conv_out", "conv_out", "plain"


RES = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"),
       ("skip", "conv_shortcut"))  # fmt: skip
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers before 0.14


def from_diffusers_state(theirs: dict[str, torch.Tensor], unet: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Our UNet's state dict from a UNet2DModel's (attention as 1x1 convs over [q; k; v])."""
    theirs = {_renamed(k): v for k, v in theirs.items()}
    ours: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in theirs:
            raise ConfigError(f"{where}: the weights lack {key} (the config says it exists)")
        return theirs.pop(key)

    for mine, their, kind in module_pairs(unet):
        if kind == "plain":
            for p in ("weight", "bias"):
                if f"{their}.{p}" in theirs or p == "weight":
                    ours[f"{mine}.{p}"] = take(f"{their}.{p}")
        elif kind == "res":
            for a, b in RES:
                if a == "skip" and f"{their}.{b}.weight" not in theirs:
                    continue
                for p in ("weight", "bias"):
                    ours[f"{mine}.{a}.{p}"] = take(f"{their}.{b}.{p}")
        else:
            for p in ("weight", "bias"):
                ours[f"{mine}.norm.{p}"] = take(f"{their}.group_norm.{p}")
            qkv = [take(f"{their}.to_{x}.weight") for x in "qkv"]
            ours[f"{mine}.qkv.weight"] = torch.cat(qkv)[:, :, None, None]
            ours[f"{mine}.qkv.bias"] = torch.cat([take(f"{their}.to_{x}.bias") for x in "qkv"])
            ours[f"{mine}.proj_out.weight"] = take(f"{their}.to_out.0.weight")[:, :, None, None]
            ours[f"{mine}.proj_out.bias"] = take(f"{their}.to_out.0.bias")
    if theirs:
        raise ConfigError(f"{where}: weights this config does not explain: {', '.join(sorted(theirs)[:3])}")
    return ours


def _renamed(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in OLD_ATTENTION:
        return ".".join(parts[:-2] + [OLD_ATTENTION[parts[-2]], parts[-1]])
    return key


def to_diffusers_state(ours: dict[str, torch.Tensor], unet: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A UNet2DModel's state dict from our UNet's (the inverse of from_diffusers_state)."""
    theirs: dict[str, torch.Tensor] = {}
    for mine, their, kind in module_pairs(unet):
        if kind == "plain":
            for p in ("weight", "bias"):
                if f"{mine}.{p}" in ours:
                    theirs[f"{their}.{p}"] = ours[f"{mine}.{p}"]
        elif kind == "res":
            for a, b in RES:
                for p in ("weight", "bias"):
                    if f"{mine}.{a}.{p}" in ours:
                        theirs[f"{their}.{b}.{p}"] = ours[f"{mine}.{a}.{p}"]
        else:
            for p in ("weight", "bias"):
                theirs[f"{their}.group_norm.{p}"] = ours[f"{mine}.norm.{p}"]
            for x, w, b in zip("qkv", ours[f"{mine}.qkv.weight"][:, :, 0, 0].chunk(3), ours[f"{mine}.qkv.bias"].chunk(3)):
                theirs[f"{their}.to_{x}.weight"], theirs[f"{their}.to_{x}.bias"] = w, b
            theirs[f"{their}.to_out.0.weight"] = ours[f"{mine}.proj_out.weight"][:, :, 0, 0]
            theirs[f"{their}.to_out.0.bias"] = ours[f"{mine}.proj_out.bias"]
    return {k: v.contiguous() for k, v in theirs.items()}


# ---- folders ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """The settings object of a config file; ConfigError naming the file when it is not JSON or not an object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: holds a JSON {type(config).__name__}; expected an object of settings ({{\"key\": value, ...}})")
    return config


def read_folder(folder: str | Path):
    """A DiffusionModule (eval mode) with the weights of a diffusers UNet2DModel folder and its DDPMScheduler's
    process; ConfigError in one line for what it cannot take."""
    from safetensors.torch import load_file

    from ddpm.module import DiffusionModule

    folder = Path(folder)
    where = str(folder)
    config = _read_json(folder / CONFIG)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{folder / CONFIG}: _class_name={json.dumps(config.get('_class_name'))}; expected \"UNet2DModel\"")
    unet = unet_kwargs(config, str(folder / CONFIG))
    if not (folder / SCHEDULER).is_file():
        raise ConfigError(f"{where}: no {SCHEDULER} (the noise schedule and what the network predicts); save the pipeline's scheduler beside the model")
    process = process_kwargs(_read_json(folder / SCHEDULER), str(folder / SCHEDULER))
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ConfigError(f"{where}: no weights; expected {' or '.join(WEIGHTS)}")
    try:
        state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file, or pickled objects that weights_only refuses
        raise ConfigError(f"{weights}: not readable as weights ({type(e).__name__}: {first_line(e)})") from e
    if process["variance"] == "learned_range" and unet["out_channels"] != 2 * unet["in_channels"]:
        raise ConfigError(f"{folder / SCHEDULER}: variance_type=\"learned_range\" needs out_channels = 2 x in_channels in {CONFIG}")
    module = DiffusionModule(unet=unet, **process)
    module.unet.load_state_dict(from_diffusers_state(state, unet, str(weights)))
    return module.eval()


def write_folder(module, folder: str | Path) -> Path:
    """A diffusers folder (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json) of `module`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    hparams = dict(module.hparams)
    scheduler = scheduler_config(hparams)
    folder.mkdir(parents=True, exist_ok=True)
    unet = dict(hparams["unet"])
    (folder / CONFIG).write_text(json.dumps(diffusers_config(unet), indent=2) + "\n")
    (folder / SCHEDULER).write_text(json.dumps(scheduler, indent=2) + "\n")
    state = {k: v.detach().float().cpu() for k, v in module.unet.state_dict().items()}
    save_file(to_diffusers_state(state, unet), folder / WEIGHTS[0])
    return folder


def write_checkpoint(module, path: str | Path) -> Path:
    """A native checkpoint of `module` that load_module and sample.py read and train.py's init_weights starts from:
    its hyperparameters and weights, step 0, no optimizer state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 0}, path)
    return path
