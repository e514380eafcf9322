"""Trains the digits CNN whose features the Fréchet distance and class accuracy are measured in.

    python scripts/train_classifier.py --epochs 30 --seed 0 --out dit_graft/assets/digits-cnn

Trains on the train split only (±1-pixel random shifts), evaluates once on the held-out split and writes
{model.safetensors, config.json} into a temporary directory that then replaces `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dit_graft.data.digits import NUM_CLASSES, load_digits_split
from dit_graft.metrics import CLASSIFIER_DIR, CONFIG_NAME, FEATURE_DIM, WEIGHTS_NAME, DigitsClassifier, classify


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shifts each image by up to `max_shift` pixels in each direction, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, 1, H+2s, W+2s)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # (N, 1, H, W)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other cores free)")
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train, heldout = load_digits_split("train"), load_digits_split("heldout")
    model = DigitsClassifier(feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for idx in perm.split(args.batch):
            x, y = random_shift(train.images[idx], gen), train.labels[idx]
            logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        print(f"epoch {epoch:3d} loss {loss_sum / seen:.4f} train_acc {correct / seen:.4f} {time.time() - t0:.0f}s")

    model.eval()
    _, pred = classify(heldout.images, model)
    heldout_acc = (pred == heldout.labels).double().mean().item()
    _, pred = classify(train.images, model)
    train_acc = (pred == train.labels).double().mean().item()
    print(f"heldout_accuracy {heldout_acc:.4f} ({len(heldout)} images) train_accuracy {train_acc:.4f}")

    config = dict(
        architecture="DigitsClassifier",
        feature_dim=FEATURE_DIM,
        num_classes=NUM_CLASSES,
        image_size=16,
        heldout_accuracy=round(heldout_acc, 6),
        heldout_size=len(heldout),
        train_accuracy=round(train_acc, 6),
        seed=args.seed,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        augmentation="random shift, up to 1 pixel each way, background fill",
        command=shlex.join(["python", *sys.argv]),
        torch_version=torch.__version__,
        train_seconds=round(time.time() - t0, 1),
    )
    out: Path = args.out
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / WEIGHTS_NAME).chmod(0o644)  # safetensors writes 0600; the asset is meant to be shared
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved {out} after {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
