"""Helper for tests/test_distributed.py, run as `torchrun --nproc_per_node=2 _ddp_train.py OUT`.

Every rank trains the same small conditional model for a few steps under DDP (gloo on CPU)
and saves its final weights, EMA weights and loss history to OUT/rank{r}.pt; rank 0 alone
writes checkpoints to OUT/ckpt. `make_trainer` is imported by the test to build the
single-process reference with the same global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scoresde import VPSDE, DSMLoss, Trainer
from scoresde.toy import benchmark_mixture_2d
from scoresde.training import build_model

STEPS = 6


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = benchmark_mixture_2d().sample(
        256, generator=torch.Generator().manual_seed(0), return_labels=True
    )
    return x, y


def make_trainer(**kwargs) -> Trainer:
    sde = VPSDE()
    model = build_model(
        sde, "mlp", (2,), num_classes=3, net_kwargs={"hidden": 32, "num_blocks": 2}, seed=0
    )
    loss = DSMLoss(sde, weighting="likelihood", importance_sampling=True, label_dropout=0.3)
    return Trainer(
        model, loss, batch_size=32, lr=1e-2, warmup_steps=2, ema_decay=0.9, seed=5, **kwargs
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(checkpoint_dir=out / "ckpt", checkpoint_every=2)
    assert trainer.dist.enabled and trainer.dist.world_size == 2
    x, y = make_data()
    seen: list[torch.Tensor] = []  # the network inputs this rank saw (its batch slice)
    trainer.model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    trainer.fit(x, STEPS, labels=y, progress=False)
    state = {
        "model": trainer.model.state_dict(),
        "ema": trainer.ema_model.state_dict(),
        "history": torch.tensor(trainer.history, dtype=torch.float64),
        "step": trainer.step,
        "inputs": torch.stack(seen),
    }
    torch.save(state, out / f"rank{trainer.dist.rank}.pt")
    from scoresde.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
