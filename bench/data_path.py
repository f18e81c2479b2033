"""Our data path vs the usual torchvision one, training the same model for the same steps.

ours:        uint8 tensors prepared once, on the training device -> DeviceBatches (a permutation
             sliced into batches, gathered, float, batched flip + translate: data/loader.py)
torchvision: the same images as a CIFAR10-style dataset (HWC uint8 array, one
             PIL.Image.fromarray per image) -> RandomCrop(32, padding=2) + RandomHorizontalFlip
             + ToTensor + Normalize per image -> DataLoader with worker processes

Both train the same model as the stages do here (bf16 autocast where `trainer.precision: auto`
picks it, else fp32), channels_last, SGD with Nesterov momentum, for
the same number of steps on the same images. `--model` picks it, at its stage's batch size:
teacher (params.yaml model, transfer.batch_size; the default), student (distill.student,
distill.batch_size) or pruned (that student pruned as params.yaml prune says, prune.batch_size).
The smaller the model, the larger the share of a step the data path takes. The model's own
Normalize layer is skipped on the torchvision arm (its
transform normalises). Also measured: the data path alone (no model).

    uv run python bench/data_path.py [--model teacher|student|pruned] [--seconds 40] [--workers 2]

Prints a table and writes bench/results/data_path.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, Clock, conv_widths, describe, load_target_task, machine, main_of, now, params, train_bf16,  # noqa: E402
                     prune_like_the_stage, save, table)

from transferkit.data.loader import DeviceBatches  # noqa: E402
from transferkit.models import CIFAR_MEAN, CIFAR_STD, model_from_config  # noqa: E402

BF16 = False  # the stages' precision on this machine: main() probes it at the thread count it runs at



class CifarLike(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: numpy HWC uint8 -> PIL -> transform."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as CIFAR10 stores it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def torchvision_loader(task: dict, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=2), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds = CifarLike(task["train_x"], task["train_y"], transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def ours_loader(task: dict, batch: int) -> DeviceBatches:
    epoch = iter(range(1 << 30))  # a new permutation each pass, as the Trainer's epochs give
    return DeviceBatches(task["train_x"], task["train_y"], batch, device="cpu", train=True, flip="random",
                         translate=2, epoch=lambda: next(epoch))


def ours_batches(loader):
    yield from _forever(loader)  # batches arrive augmented and in channels_last


def torchvision_batches(loader):
    for x, y in _forever(loader):
        yield x.contiguous(memory_format=torch.channels_last), y


def _forever(loader):
    while True:  # a new epoch (a new shuffle) each pass, as a Trainer does
        yield from loader


def train(model: nn.Module, batches, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds for `steps` steps after `warmup` untimed ones, final loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()

    def step():
        x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    with Clock() as c:
        for _ in range(steps):
            loss = step()
    return c.seconds, float(loss.detach())


def data_only(batches, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        next(batches)
    with Clock() as c:
        for _ in range(steps):
            next(batches)
    return c.seconds


def bench_model(p: dict, which: str, num_classes: int) -> tuple[nn.Module, int]:
    """(freshly built model, its stage's batch size). Speed depends on the layer widths, not the
    weights, so a random init is what a trained model costs."""
    if which == "teacher":
        return model_from_config(p["model"], num_classes), int(p["transfer"]["batch_size"])
    student = model_from_config(p["distill"]["student"], num_classes)
    if which == "student":
        return student, int(p["distill"]["batch_size"])
    prune_like_the_stage(student.eval(), p["prune"])
    return student, int(p["prune"]["batch_size"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["teacher", "student", "pruned"], default="teacher",
                    help="which stage's model both arms train (at that stage's batch size)")
    ap.add_argument("--seconds", type=float, default=40, help="target length of our training arm")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision arm")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: from --seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, all cores, as trainer.num_threads=null does)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global BF16
    BF16 = train_bf16()  # the stages' precision on this machine, at this thread count (the probe's cache key)

    p = params()
    task, source = load_target_task(args.artifacts)
    torch.manual_seed(0)
    base, batch = bench_model(p, args.model, len(task["classes"]))
    base = base.to(memory_format=torch.channels_last)
    state = copy.deepcopy(base.state_dict())
    widths = conv_widths(base)
    info = {"when": now(), "machine": machine(), "data": source, "batch_size": batch, "model": args.model,
            "conv_widths": widths, "precision": f"{'bf16 autocast' if BF16 else 'fp32'}, channels_last"}
    print(f"{describe(info['machine'])}\ndata: {source}; model: {args.model} (convs {widths}); batch {batch}",
          flush=True)

    # our arm: calibrate the step count on it, then run it
    warmup = 5
    torch.manual_seed(0)
    ours_model = copy.deepcopy(base)
    ours = ours_batches(ours_loader(task, batch))
    if args.steps:
        steps = args.steps
    else:
        t, _ = train(ours_model, ours, 5, warmup)
        # capped: a quiet spell during calibration on a shared machine must not make a 5-minute arm
        steps = min(300, max(20, int(args.seconds / (t / 5))))
    print(f"{steps} timed steps per arm ({warmup} untimed warm-up steps each)", flush=True)
    rows = []
    ours_model.load_state_dict(state)
    secs, loss = train(ours_model, ours, steps, warmup)
    rows.append({"arm": "ours: uint8 tensors + batched augment", "what": "train", "steps": steps,
                 "seconds": secs, "img_s": steps * batch / secs, "loss": loss})
    print(table(rows[-1:], COLUMNS), flush=True)

    torch.manual_seed(0)
    tv_model = copy.deepcopy(base)
    tv_model.load_state_dict(state)
    tv_model.normalize = nn.Identity()  # the transform has normalised already
    tv_loader = torchvision_loader(task, batch, args.workers)
    secs, loss = train(tv_model, torchvision_batches(tv_loader), steps, warmup)
    rows.append({"arm": f"torchvision: PIL per image, {args.workers} workers", "what": "train", "steps": steps,
                 "seconds": secs, "img_s": steps * batch / secs, "loss": loss})
    print(table(rows[-1:], COLUMNS), flush=True)

    # the data paths alone: what each can feed at most
    data_steps = 200
    secs = data_only(ours_batches(ours_loader(task, batch)), data_steps, warmup)
    rows.append({"arm": "ours: uint8 tensors + batched augment", "what": "data only", "steps": data_steps,
                 "seconds": secs, "img_s": data_steps * batch / secs})
    for w in sorted({1, args.workers}):
        loader = tv_loader if w == args.workers else torchvision_loader(task, batch, w)
        secs = data_only(torchvision_batches(loader), data_steps, warmup)
        rows.append({"arm": f"torchvision: PIL per image, {w} worker{'s' if w > 1 else ''}", "what": "data only",
                     "steps": data_steps, "seconds": secs, "img_s": data_steps * batch / secs, "workers": w})
    del tv_loader

    train_ratio = rows[0]["img_s"] / rows[1]["img_s"]
    data_ratio = rows[2]["img_s"] / next(r for r in rows if r.get("workers") == args.workers)["img_s"]
    print()
    print(table(rows, COLUMNS))
    print(f"\ntraining: ours / torchvision = {train_ratio:.2f}x (bar: >= 3x) -> "
          f"{'met' if train_ratio >= 3 else 'NOT met'}")
    print(f"data path alone: ours / torchvision ({args.workers} workers) = {data_ratio:.1f}x")
    info["machine_after"] = machine()
    print(f"after: {describe(info['machine_after'])}")
    path = save("data_path" + (f"-{args.model}" if args.model != "teacher" else "")
                + (f"-threads{args.threads}" if args.threads else ""),
                {**info, "rows": rows, "train_ratio": train_ratio, "data_only_ratio": data_ratio,
                 "bar": 3.0, "bar_met": train_ratio >= 3})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


COLUMNS = [("arm", "data path", "s"), ("what", "measures", "s"), ("steps", "steps", "d"),
           ("seconds", "seconds", ".1f"), ("img_s", "images/s", ",.0f")]

if __name__ == "__main__":
    sys.exit(main_of(main))
