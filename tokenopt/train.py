"""Training entry point: a small ViT on Fashion-MNIST, from scratch or fine-tuned with a learned policy.

    tokenopt train --out out/fmnist_vit --epochs 6                                   # plain ViT, from scratch
    tokenopt train --out out/fmnist_avit --policy avit --init out/fmnist_vit/model.pt --epochs 2
    torchrun --nproc-per-node 2 -m tokenopt.train --out out/ddp --epochs 1       # the same, 2 processes
    tokenopt train --out out/vit192 --embed-dim 192 --heads 3 --mlp-ratio 4 --device cuda   # wider, on a GPU
    tokenopt train --out out/avit2 --policy avit --init out/avit/model.pt --distill --teacher out/vit/model.pt \\
        --precision bf16                                                         # continue a fine-tune
    tokenopt train --out out/dvit2 --policy dynamicvit --init out/dvit/model.pt --init-policy out/dvit/policy.pt \\
        --distill --teacher out/vit/model.pt                          # continue one whose policy has its own weights

One process or several under ``torchrun`` (``DistributedDataParallel``; gloo on CPU, nccl on CUDA) run
the same steps: every step takes the same global batch (a seeded permutation per epoch), each process
its equal share of it, so the logged loss (averaged over processes) equals one process's on the whole
batch. Rank 0 shows a progress display, writes ``log.json`` (per epoch: losses, test accuracy, tokens
per block, time) and a checkpoint after each epoch (``checkpoint.pt``: weights, optimizer, scheduler,
RNG states, the log) from which ``--resume`` continues exactly; ``model.pt`` holds the weights of the
original architecture (an ordinary state dict) and ``policy.pt`` a learned policy's own weights
(AdaViT's and DynamicViT's decision networks: ``optimize(model, policy, policy_state="policy.pt")``).
Policies: ``none``, ``avit``, ``adavit``, ``dynamicvit`` and ``sait`` (alternating dense and sparse steps: density 1 on even steps,
``train_density`` on odd ones, or a density drawn uniformly from a ``train_density=(low, high)`` range); ``--distill`` adds a KL term to the predictions of the ``--teacher``
model (default: the ``--init`` model; name the unpruned model when ``--init`` continues a fine-tune)
(weight: the policy's ``distill_weight``, else 0.5). The model: a timm ViT at 28x28, patch 2 (196 patch
tokens + CLS), one input channel, no dropout (so runs are deterministic and comparable). ``--device``:
where it computes (auto: CUDA where there is one, TF32 matrix products there); ``model.pt`` and
``policy.pt`` are CPU state dicts whatever the device. ``--precision bf16`` runs the forward passes
(student and teacher) under bfloat16 autocast, losses and weights in float32: about 1.7x faster per step on
a CPU with AMX (measured on this project's 2-core machine); the per-epoch evaluation stays float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["TrainConfig", "build_model", "load_run", "train", "main"]

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (train split)
PRECISIONS = ("fp32", "bf16")  # --precision: float32, or the forward passes under bfloat16 autocast
CALIBRATION_IMAGES = 2048  # training images a policy's after-training step sees (AdaViT: gate usage)


@dataclasses.dataclass
class TrainConfig:
    out: str = "out/fmnist_vit"
    policy: str = "none"  # "none", "avit", "adavit", "dynamicvit" or "sait"
    policy_options: dict = dataclasses.field(default_factory=dict)
    init: Optional[str] = None  # a model.pt to start from (fine-tuning)
    init_policy: Optional[str] = None  # a policy.pt or checkpoint.pt to start the policy's own modules from (continuing)
    epochs: int = 6
    batch: int = 128  # global batch
    lr: float = 1e-3
    policy_lr_scale: float = 1.0  # the learning rate of the policy's own modules (decision networks), x lr
    weight_decay: float = 0.05
    warmup_steps: int = 100
    train_images: int = 60000
    test_images: int = 10000
    embed_dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    seed: int = 0
    resume: bool = False
    stop_after_epoch: Optional[int] = None  # (tests: stop early, as if interrupted)
    no_progress: bool = False  # no progress display
    distill: bool = False  # distil from the teacher's predictions (KL)
    teacher: Optional[str] = None  # the model.pt to distil from (default: the --init model)
    precision: str = "fp32"  # "fp32", or "bf16": bfloat16 autocast of the forward passes (AMX CPUs, GPUs)
    device: str = "auto"  # "auto" (CUDA when there is one), "cpu", "cuda"; under torchrun: each rank its local GPU


def distillation(logits: torch.Tensor, teacher_logp: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * KL(teacher || student)`` per image (``batchmean``), the teacher given as log-probabilities."""
    return weight * F.kl_div(F.log_softmax(logits, dim=-1), teacher_logp, reduction="batchmean", log_target=True)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=2, in_chans=1,
                             num_classes=10, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.heads,
                             mlp_ratio=cfg.mlp_ratio, drop_rate=0.0, drop_path_rate=0.0)


def load_run(run: str) -> tuple[TrainConfig, torch.nn.Module, Optional[str]]:
    """A finished ``tokenopt train`` run: its config, the model with its trained weights (eval mode) and
    the path of its ``policy.pt`` (None when the policy has no weights of its own)."""
    with open(os.path.join(run, "log.json")) as f:
        doc = json.load(f)
    cfg = TrainConfig(**{k: v for k, v in doc["config"].items() if k in TrainConfig.__dataclass_fields__})
    model = build_model(cfg)
    model.load_state_dict(torch.load(os.path.join(run, "model.pt"), map_location="cpu", weights_only=True))
    policy_pt = os.path.join(run, "policy.pt")
    return cfg, model.eval(), (policy_pt if os.path.exists(policy_pt) else None)


def _data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenopt.fidelity import load_fashion_mnist

    images, labels = load_fashion_mnist(split, n)
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1), labels


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _schedule(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train(was)
    return correct / len(labels)


def _device(cfg: TrainConfig) -> torch.device:
    """Where the run computes: ``cfg.device``, with "auto" meaning CUDA when there is one; under
    ``torchrun`` on CUDA each process takes its ``LOCAL_RANK``'s GPU."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: this machine has no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run the recipe (see the module docstring); returns the log."""
    import tokenopt

    rank, world = _world()
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} must divide evenly over {world} processes")
    if cfg.teacher and not cfg.distill:
        raise ValueError("--teacher names the model to distil from; add --distill")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not (math.isfinite(cfg.policy_lr_scale) and cfg.policy_lr_scale > 0):
        raise ValueError(f"--policy-lr-scale {cfg.policy_lr_scale}: must be a number > 0 (1 = the model's learning rate)")
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matrix products on GPUs that have them
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg)
    if cfg.init:
        model.load_state_dict(torch.load(cfg.init, map_location="cpu", weights_only=True))
    model.to(device)
    train_x, train_y = (t.to(device) for t in _data("train", cfg.train_images))
    test_x, test_y = (t.to(device) for t in _data("test", cfg.test_images))
    example = (train_x[:2],)  # captured on the run's device (factory calls in the graph are placed there)
    teacher = None
    if cfg.distill:
        if not (cfg.teacher or cfg.init):
            raise ValueError("--distill learns from the --teacher model (default: the --init model); give one a model.pt")
        teacher = build_model(cfg)
        teacher.load_state_dict(torch.load(cfg.teacher or cfg.init, map_location="cpu", weights_only=True))
        teacher.to(device).eval().requires_grad_(False)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    net = tokenopt.prepare_training(model, policy=cfg.policy, example_inputs=example, **cfg.policy_options)
    if cfg.init_policy:
        _load_policy(net, cfg)
    policy = net.meta["tokenopt.policy"]
    distill_weight = getattr(policy, "distill_weight", 0.5)
    knobs = net.knobs  # (SaiT: density, the value it runs at; training alternates it)
    steps_per_epoch = len(train_y) // cfg.batch
    # the policy's own modules (tokenopt_<policy>.*: AdaViT's and DynamicViT's decision networks) may learn
    # faster than the model they steer (AdaViT's code has such scales: --ada-{token,head,layer}-lr-scale)
    own = [p for name, p in net.named_parameters() if name.startswith("tokenopt_")]
    rest = [p for name, p in net.named_parameters() if not name.startswith("tokenopt_")]
    groups = [{"params": rest}] + ([{"params": own, "lr": cfg.lr * cfg.policy_lr_scale}] if own else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps_per_epoch * cfg.epochs))
    log: list[dict] = []
    start_epoch = 0
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        random.setstate(ckpt["python_rng"])
        log, start_epoch = ckpt["log"], ckpt["epoch"] + 1
    ddp = net
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    display = _Display(enabled=progress and rank == 0, total=steps_per_epoch)
    shard = cfg.batch // world
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        draw = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the epoch's data order, then SaiT's densities
        order = torch.randperm(len(train_y), generator=draw).to(device)
        uniform = torch.rand(steps_per_epoch, generator=draw).tolist()  # (the same on every process)
        sums: dict[str, float] = {}
        display.start(f"epoch {epoch + 1}/{cfg.epochs}")
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch:(step + 1) * cfg.batch][rank * shard:(rank + 1) * shard]
            if "density" in knobs:  # SaiT: dense and sparse steps alternate
                net.density = 1.0 if step % 2 == 0 else policy.sparse_density(uniform[step])
            with autocast():  # (bf16: matrix products in bfloat16; losses below in float32)
                logits = ddp(train_x[idx]).float()
            task = F.cross_entropy(logits, train_y[idx])
            aux = {k: v.float() for k, v in net.aux_losses().items()}
            if teacher is not None:
                with torch.no_grad(), autocast():
                    target = F.log_softmax(teacher(train_x[idx]).float(), dim=-1)
                aux["distill"] = distillation(logits, target, distill_weight)
            loss = task + sum(aux.values(), torch.zeros((), device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # the policy's losses, then what its decisions used (train_<stat>: DynamicViT's kept share per
            # stage, inference's rho ** s beside it in a log shows whether training prunes as inference does)
            stats = {f"train_{k}": v.float() for k, v in net.training_stats().items()}
            logged = {**aux, **stats}
            names = ["loss", "task", *sorted(logged)]  # (the same on every process)
            values = torch.stack([loss.detach(), task.detach(), *(logged[k].detach() for k in sorted(logged))])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            for k, v in zip(names, values.tolist()):
                sums[k] = sums.get(k, 0.0) + v
            display.advance(f"loss {values[0].item():.4f}",  # (a log file: the epoch's means so far)
                            lambda: ", ".join(f"{k} {v / (step + 1):.4g}" for k, v in sums.items()))
        display.stop()
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                  "lr": sched.get_last_lr()[0], "seconds": round(time.time() - started, 1)}
        if rank == 0:
            for name, value in knobs.items():  # evaluate at the configured knob values
                setattr(net, name, value)
            record.update(_measure(net, test_x, test_y))
            log.append(record)
            _save(cfg, net, opt, sched, epoch, log)
            display.note(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in record.items() if k != "epoch"))
        else:
            log.append(record)
        if world > 1:
            dist.barrier()
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
            break
    finished = bool(log) and log[-1]["epoch"] == cfg.epochs
    if finished and rank == 0 and hasattr(policy, "after_training"):  # (AdaViT: calibrate its gates' usage)
        net.eval()
        report = policy.after_training(net, train_x[:CALIBRATION_IMAGES])
        if report is not None:
            log[-1]["after_training"] = {"report": report, **_measure(net, test_x, test_y)}
            _save_policy(cfg, net, log)  # policy.pt and log.json; checkpoint.pt keeps the trained state (resume)
            display.note("after training: " + ", ".join(f"{k} {v}" for k, v in log[-1]["after_training"].items()
                                                          if k != "report"))
        net.train()
    return {"log": log, "net": net}


def _measure(net, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    """Test accuracy (eval mode) and the tokens after each block (first 500 test images, per image)."""
    import tokenopt

    accuracy = evaluate(net, test_x, test_y)
    was = net.training
    net.eval()
    counts = tokenopt.token_counts(net.eval_graph, test_x[:500])
    net.train(was)
    return {"test_accuracy": accuracy, "tokens_per_block": [round(c.float().mean().item(), 2) for c in counts.values()]}


def _load_policy(net, cfg: TrainConfig) -> None:
    """``--init-policy``: the policy's own modules (decision networks) from a ``policy.pt``, or from a
    ``checkpoint.pt`` (the networks as trained, before any ``after_training`` step such as AdaViT's gate
    calibration), whose names must be exactly this policy's (same policy, blocks and model size), so a
    continued fine-tune starts from the trained decisions instead of fresh ones."""
    own = net.policy_state_dict()
    if not own:
        raise ValueError(f"--init-policy {cfg.init_policy}: policy {cfg.policy!r} has no weights of its own "
                         f"(only adavit and dynamicvit do); drop --init-policy")
    state = torch.load(cfg.init_policy, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict) and "optimizer" in state:  # a checkpoint.pt: its policy's weights
        from tokenopt.module import policy_weights

        state = policy_weights(state["model"])
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"--init-policy {cfg.init_policy} does not fit policy {cfg.policy!r} on this model: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; give the policy.pt of a run with "
                         f"the same --policy, --set blocks and model size")
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"--init-policy {cfg.init_policy}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, this "
                         f"model's has {tuple(own[bad[0]].shape)}; give the policy.pt of a run with the same model size")
    net.load_state_dict(state, strict=False)


def _cpu(state: dict) -> dict:
    """A state dict as CPU tensors: model.pt and policy.pt load anywhere."""
    return {k: v.detach().cpu() for k, v in state.items()}


def _save_policy(cfg: TrainConfig, net, log: list) -> None:
    """After a policy's ``after_training`` step: its weights (``policy.pt``) and the log, atomically."""
    _write(cfg, [("policy.pt", _cpu(net.policy_state_dict()))], log)


def _write(cfg: TrainConfig, saved: list, log: list) -> None:
    for name, obj in saved:
        tmp = os.path.join(cfg.out, f".{name}.{os.getpid()}.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, os.path.join(cfg.out, name))
    tmp = os.path.join(cfg.out, f".log.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "epochs": log}, f, indent=1)
    os.replace(tmp, os.path.join(cfg.out, "log.json"))


def _save(cfg: TrainConfig, net, opt, sched, epoch: int, log: list) -> None:
    """Checkpoint (to resume) and the plain weights (model.pt), each written atomically."""
    on_cuda = any(p.is_cuda for p in net.parameters())
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "epoch": epoch, "log": log,
             "config": dataclasses.asdict(cfg), "cuda_rng": torch.cuda.get_rng_state() if on_cuda else None}
    saved = [("checkpoint.pt", state), ("model.pt", _cpu(net.model_state_dict()))]
    if net.policy_state_dict():
        saved.append(("policy.pt", _cpu(net.policy_state_dict())))
    _write(cfg, saved, log)


class _Display:
    """A rich progress bar on rank 0 (nothing elsewhere, or when disabled)."""

    def __init__(self, enabled: bool, total: int):
        import sys

        self.enabled, self.total, self.bar = enabled, total, None
        self.plain = enabled and not sys.stdout.isatty()  # a log file: a line every 10% instead of a bar

    def start(self, title: str) -> None:
        self.title, self.done, self.started = title, 0, time.time()
        if not self.enabled or self.plain:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.bar.start()
        self.task = self.bar.add_task(title, total=self.total, info="")

    def advance(self, info: str, means=None) -> None:
        """One step done; ``info`` for the bar, ``means()`` (the epoch's mean losses and statistics so far)
        for a log file's line, which comes every 10% of the epoch."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        elif self.plain and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            rate = self.done / max(time.time() - self.started, 1e-9)
            print(f"{self.title}: {self.done}/{self.total} steps, {rate:.2f} steps/s, "
                  f"{means() if means is not None else info}", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def note(self, text: str) -> None:
        if self.enabled:
            from rich.console import Console

            Console().print(text)


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="tokenopt train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    helps = {"out": "folder for log.json, checkpoint.pt and model.pt", "policy": "none, avit, adavit, dynamicvit or sait",
             "init": "a model.pt to start from (fine-tuning)",
             "init_policy": "a policy.pt (adavit, dynamicvit) to start the policy's decision networks from; a "
                            "checkpoint.pt gives them as trained (AdaViT: before its gate calibration)",
             "batch": "global batch (split over processes)",
             "train_images": "first N training images", "test_images": "first N test images (accuracy each epoch)",
             "warmup_steps": "linear warm-up, then cosine decay", "seed": "data order and initialisation",
             "device": "auto (CUDA when there is one), cpu or cuda[:N]; under torchrun each process its LOCAL_RANK GPU",
             "teacher": "with --distill: the model.pt to distil from (default: the --init model)",
             "policy_lr_scale": "the policy's own modules (AdaViT's and DynamicViT's decision networks) learn at lr x this",
             "precision": "fp32, or bf16 (bfloat16 autocast: about 1.7x faster here, a CPU with AMX; evaluation stays fp32)"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("policy_options", "resume", "stop_after_epoch", "no_progress", "distill"):
            continue
        kind = type(getattr(defaults, f.name)) if getattr(defaults, f.name) is not None else str
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name),
                        help=f"{helps.get(f.name, '')} (default: {getattr(defaults, f.name)})".strip())
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy option, e.g. --set gamma=10 --set beta=30")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--distill", action="store_true", help="distil from the --teacher (default --init) model's predictions (KL)")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch", "train_images", "test_images", "depth", "heads", "embed_dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.precision not in PRECISIONS:
        ap.error(f"--precision {args.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if args.device != "auto":
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            ap.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    from tokenopt.cli import _parse_sets

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if f.name not in ("policy_options", "stop_after_epoch")})
    cfg.policy_options = _parse_sets(args.set)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if _device(cfg).type == "cuda" else "gloo")
    try:
        train(cfg, progress=not cfg.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
