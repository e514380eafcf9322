"""Pretrains the bundled digits DiT teacher (class-conditional, learned variance) on this CPU.

    python scripts/train_teacher.py --steps 6000 --out dit_graft/assets/digits-dit

`--init DIR` continues from a saved teacher (its EMA weights start both the model and the EMA; the
optimizer starts fresh). The earlier run's arguments and loss curve are kept under "previous" in the
new train_log.json, so the full history of the committed weights stays readable.

Loss = eps MSE + the learned-variance KL term (as DiT/improved DDPM); 10% of labels are replaced by
the null class for classifier-free guidance; the exported weights are the EMA weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from dit_graft.data.digits import NUM_CLASSES, load_digits_split
from dit_graft.diffusion import Schedule, split_output
from dit_graft.families.dit import freeze_label_dropout


def digits_dit_config(size: int = 16) -> dict:
    """6 blocks, hidden 128 (4 heads x 32), patch 2 on 16x16 pixels: an 8x8 token grid, 2.2M params."""
    return dict(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=2,
        num_layers=6,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("dit_graft/assets/digits-dit"))
    p.add_argument("--init", type=Path, default=None, help="continue from this saved teacher directory")
    p.add_argument("--warmup", type=int, default=200)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits_split("train")
    previous = None
    if args.init is not None:
        model = DiTTransformer2DModel.from_pretrained(args.init)
        log_file = args.init / "train_log.json"
        previous = json.loads(log_file.read_text()) if log_file.exists() else None
    else:
        model = DiTTransformer2DModel(**digits_dit_config())
    freeze_label_dropout(model.train())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    schedule = Schedule.linear()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )
    log, t0, gen = [], time.time(), torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        x0, y = data.images[idx], data.labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < 0.1] = NUM_CLASSES
        t = torch.randint(0, schedule.num_steps, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = schedule.q_sample(x0, t, noise)
        eps, v = split_output(model(xt, timestep=t, class_labels=y).sample, 1)
        mse = torch.mean((eps - noise) ** 2)
        vb = schedule.vlb_loss(eps, v, x0, xt, t)
        loss = mse + vb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - args.ema)
        if step % 50 == 0 or step == args.steps - 1:
            log.append(dict(step=step, loss=loss.item(), mse=mse.item(), vb=vb.item(), s=time.time() - t0))
            print(json.dumps(log[-1]), flush=True)

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp, safe_serialization=True)
    record = dict(args={k: str(v) for k, v in vars(args).items()}, log=log, previous=previous)
    (tmp / "train_log.json").write_text(json.dumps(record))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"saved {args.out} after {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
