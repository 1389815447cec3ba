"""Model and SDE recipes: `build_sde` / `build_model` make a model from names (for the CLI
and the trainer), and record the plain-dict spec (`model.spec`, `model_spec`) that rebuilds
it from a checkpoint or a saved model alone (`_model_from_spec`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scoresde._validation import check_choice
from scoresde.nets.embedding import FourierTimeEmbedding
from scoresde.nets.mlp import MLPScoreNet
from scoresde.nets.score_model import ScoreModel
from scoresde.nets.unet import UNet
from scoresde.sdes import SDE, VESDE, VPSDE, CosineVPSDE, SubVPSDE

__all__ = ["SDE_NAMES", "NET_NAMES", "build_sde", "sde_config", "build_model", "model_spec"]

SDE_NAMES: dict[str, type[SDE]] = {
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "cosine": CosineVPSDE,
}
NET_NAMES = ("mlp", "unet")


def build_sde(name: str, **kwargs: Any) -> SDE:
    """An SDE by name: "vp", "subvp", "ve" or "cosine", with its constructor's kwargs."""
    check_choice("sde", name, tuple(SDE_NAMES))
    return SDE_NAMES[name](**kwargs)


def sde_config(sde: SDE) -> dict[str, Any]:
    """{"name": ..., constructor kwargs} of a built-in SDE (inverse of `build_sde`)."""
    return sde.config()  # asked of the SDE (scoresde.sdes)


def build_model(
    sde: str | SDE = "vp",
    net: str = "mlp",
    data_shape: Sequence[int] = (2,),
    parameterization: str = "eps",
    *,
    num_classes: int | None = None,
    sde_kwargs: dict[str, Any] | None = None,
    net_kwargs: dict[str, Any] | None = None,
    seed: int | None = 0,
    scale_input: bool = True,
    preconditioning: str = "gaussian",
    sigma_data: float = 1.0,
) -> ScoreModel:
    """A `ScoreModel` from names, e.g. `build_model("vp", "unet", (1, 8, 8))`.

    Args:
        sde: an SDE name ("vp", "subvp", "ve", "cosine"; kwargs in `sde_kwargs`) or an SDE.
        net: "mlp" (`MLPScoreNet(dim=prod(data_shape))`, for any data shape) or "unet"
            (`UNet(in_channels=C)`, data_shape (C, H, W)); extra kwargs in `net_kwargs`.
        data_shape: the shape D of one sample (without the batch dimension).
        parameterization: "eps" (default, as `ScoreModel` and DDPM), "v", "score" or "x0".
            With the default Gaussian preconditioning every one samples as well with the
            probability-flow ODE solvers as with SDE solvers (before it, raw eps- and
            score-networks did not: see docs/solvers.md).
        num_classes: labels for a conditional network (label num_classes = null class).
        seed: seeds the weight initialisation without touching the global RNG (None: use
            the global RNG).
        scale_input, preconditioning, sigma_data: passed to `ScoreModel`. A recorded spec
            without "preconditioning" (checkpoints made before it existed) means "none".

    The returned model carries `model.spec`, the plain-dict recipe that rebuilds it, which
    the Trainer stores in checkpoints.
    """
    data_shape = tuple(int(d) for d in data_shape)
    if not data_shape or any(d < 0 for d in data_shape) or data_shape[0] <= 0:
        raise ValueError(
            "data_shape must be a non-empty tuple of non-negative ints with a positive first "
            f"entry (0 = any size, for the U-Net's H and W), got {data_shape!r}"
        )
    check_choice("net", net, NET_NAMES)
    net_kwargs = dict(net_kwargs or {})
    if isinstance(sde, SDE):
        sde_obj, sde_cfg = sde, sde_config(sde)
    else:
        sde_obj = build_sde(sde, **(sde_kwargs or {}))
        sde_cfg = sde_config(sde_obj)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if net == "mlp":
            network: nn.Module = MLPScoreNet(
                dim=math.prod(data_shape), num_classes=num_classes, **net_kwargs
            )
        else:
            if len(data_shape) != 3:  # (H, W may be 0 in a recorded spec: any size)
                raise ValueError(f"net='unet' needs data_shape (C, H, W), got {data_shape!r}")
            network = UNet(in_channels=data_shape[0], num_classes=num_classes, **net_kwargs)
    model = ScoreModel(
        network,
        sde_obj,
        parameterization,
        scale_input=scale_input,
        preconditioning=preconditioning,
        sigma_data=sigma_data,
    )
    model.spec = {  # type: ignore[attr-defined]
        "sde": sde_cfg,
        "net": net,
        "data_shape": list(data_shape),
        "num_classes": num_classes,
        "net_kwargs": net_kwargs,
        **model.config(),  # parameterization, scale_input, ... (ScoreModel's own options)
    }
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The `build_model` recipe of a model: its `spec` if `build_model` made it, else one
    read off a `ScoreModel` of a built-in SDE around an `MLPScoreNet` or `UNet`; None for
    anything else (such a model is saved, but must be rebuilt by its author to load)."""
    spec = getattr(model, "spec", None)
    if spec is not None:
        return spec
    if not isinstance(model, ScoreModel) or sde_config(model.sde).get("custom"):
        return None
    net = model.net
    if type(net) is UNet:
        kwargs = dict(net.init_kwargs)
        name, shape = "unet", [kwargs.pop("in_channels"), 0, 0]  # H, W: any
    elif type(net) is MLPScoreNet:
        first = net.time_embed[0]
        kwargs = {
            "hidden": net.inp.out_features,
            "num_blocks": len(net.blocks),
            "time_embedding": "fourier"
            if isinstance(first, FourierTimeEmbedding)
            else "sinusoidal",
            "embed_dim": net.time_embed[1].in_features,
        }
        name, shape = "mlp", [net.dim]
    else:
        return None
    num_classes = kwargs.pop("num_classes", None) if name == "unet" else net.num_classes
    return {
        "sde": sde_config(model.sde),
        "net": name,
        "data_shape": shape,
        "num_classes": num_classes,
        "net_kwargs": kwargs,
        **model.config(),
    }


def _model_from_spec(spec: dict[str, Any], *, meta: bool = False) -> ScoreModel:
    """The model of a `build_model` spec; `meta=True` builds it on the meta device (shapes
    only, no memory), to check a checkpoint's spec against its tensors first."""
    from scoresde.checkpoints import CheckpointError  # (checkpoints imports this module)

    sde_cfg = dict(spec["sde"])
    if sde_cfg.pop("custom", False):
        raise CheckpointError(
            f"the checkpoint's SDE {sde_cfg.get('name')!r} is not built in; build the model "
            "yourself and use trainer.load(path)"
        )
    name = sde_cfg.pop("name")
    sde = build_sde(name, **sde_cfg)  # (outside the meta context: the SDE's own tables)
    # ScoreModel's own options (parameterization, scale_input, ...) go through as they are.
    options = {k: spec[k] for k in ScoreModel.option_names() if k in spec}
    # Specs written before preconditioning existed mean the raw network output.
    options.setdefault("preconditioning", "none")
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_model(
            sde,
            spec["net"],
            spec["data_shape"],
            num_classes=spec.get("num_classes"),
            net_kwargs=spec.get("net_kwargs"),
            seed=0,  # overwritten by the weights; seeded so the global RNG is untouched
            **options,
        )
