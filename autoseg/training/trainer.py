"""The training loop for one fold of one configuration, readable top to bottom.

Everything it writes lives in `WORKDIR/models/<configuration>/fold_<K>/` (docs/workspace.md).
In a data-parallel run (training/distributed.py, docs/distributed.md) every process runs this loop
on its share of the batch; rank 0 alone logs, plots, validates and writes checkpoints.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoseg import workspace
from autoseg.device import (
    autocast_context,
    choose_device,
    configure_cudnn,
    gradient_scaler,
    mixed_precision_dtype,
    pin_memory_for,
)
from autoseg.errors import AutosegError
from autoseg.model_files import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from autoseg.network.unet import build_unet, deep_supervision_scales
from autoseg.planning.plans import ConfigurationPlan, ElasticDeformation, Plans
from autoseg.preprocessing import store
from autoseg.preprocessing.preprocess import is_current, preprocessing_key
from autoseg.training import distributed
from autoseg.training.augmentation import (
    AUGMENT_INTERPOLATIONS,
    DEFAULT_AUGMENT_INTERPOLATION,
    DEFAULT_LABEL_INTERPOLATION,
    DEFAULT_SCALE_DRAW,
    LABEL_INTERPOLATIONS,
    SCALE_DRAWS,
    default_workers,
    make_loader,
    rotation_for_patch,
    shutdown_loader,
    training_patch_size,
    training_transforms,
    validation_transforms,
)
from autoseg.training.cascade import next_stage_dir, next_stage_file
from autoseg.training.compilation import training_forward
from autoseg.training.loss import (
    DeepSupervisionLoss,
    DiceCELoss,
    RegionDiceBCELoss,
    deep_supervision_weights,
    region_targets,
)
from autoseg.training.patch_sampling import PatchLoader
from autoseg.training.pretrained import load_pretrained_weights
from autoseg.training.progress_plot import plot_progress
from autoseg.training.splits import fold_cases, load_or_create_splits

log = logging.getLogger(__name__)


class TrainingError(AutosegError):
    """A fold that cannot be trained as asked; the message names the file or setting and the fix."""


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    batch_size: int | None = None  # None: the plan's; a smaller batch takes more, cheaper steps in the same time
    initial_lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    lr_exponent: float = 0.9
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    ema_momentum: float = 0.9  # weight of the previous EMA of the validation pseudo-Dice
    checkpoint_every: int = 1  # epochs between checkpoint_latest writes (and always at the end)
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    device: str | None = None  # None: CUDA if available, else CPU
    mixed_precision: bool = True  # float16 autocast on CUDA; bfloat16 on a CPU with native bf16
    validate_at_end: bool = True
    # Validation probabilities (<case>.npz) for `autoseg crossval`'s ensembles; None: when the plans have
    # more than one configuration.
    save_probabilities: bool | None = None
    pretrained: str | None = None  # a checkpoint to start from (fine-tuning; training/pretrained.py)
    # The U-Net paper's elastic deformation: None follows the plan ("elastic_deformation"), True turns it on
    # (the plan's settings, or the paper's), False off
    elastic: bool | None = None
    # torch.compile of the training network: None = on for CUDA, off elsewhere (nnU-Net's default); True/False
    compile: bool | None = None
    # Image interpolation of the spatial transform (rotation, scaling): "linear" (nnU-Net 2.8.1's, the default)
    # or "cubic" (autoseg's before 2026-12-03). docs/planning.md has the ablation.
    augment_interpolation: str = DEFAULT_AUGMENT_INTERPOLATION
    # The spatial transform's scale draw: "uniform" (nnU-Net 2.8.1's, the default) or "batchgenerators";
    # augmentation.SCALE_DRAWS, docs/planning.md
    augment_scale_draw: str = DEFAULT_SCALE_DRAW
    # The spatial transform's label interpolation: "nearest" (the default) or "linear" (nnU-Net 2.8.1's argmax of
    # each label's interpolated indicator); augmentation.LABEL_INTERPOLATIONS, docs/planning.md
    augment_label_interpolation: str = DEFAULT_LABEL_INTERPOLATION

    def __post_init__(self) -> None:
        for name in ("epochs", "iters_per_epoch", "val_iters", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TrainingError(f"batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise TrainingError(f"workers must be 0 or more, got {self.workers}")
        if self.augment_interpolation not in AUGMENT_INTERPOLATIONS:
            raise TrainingError(f"augment-interpolation must be one of {', '.join(AUGMENT_INTERPOLATIONS)}, "
                                f"got {self.augment_interpolation!r}")
        if self.augment_scale_draw not in SCALE_DRAWS:
            raise TrainingError(f"augment-scale-draw must be one of {', '.join(SCALE_DRAWS)}, "
                                f"got {self.augment_scale_draw!r}")
        if self.augment_label_interpolation not in LABEL_INTERPOLATIONS:
            raise TrainingError(f"augment-label-interpolation must be one of {', '.join(LABEL_INTERPOLATIONS)}, "
                                f"got {self.augment_label_interpolation!r}")


def elastic_for(config: ConfigurationPlan, choice: bool | None) -> ElasticDeformation | None:
    """The elastic deformation a run uses: the plan's, unless `autoseg train --elastic/--no-elastic` says."""
    if choice is None:
        return config.elastic_deformation
    return (config.elastic_deformation or ElasticDeformation()) if choice else None


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """Polynomial decay over the (possibly shortened) schedule."""
    return initial_lr * (1 - epoch / epochs) ** exponent


def _to_device(x, device: torch.device, memory_format=None, pin_memory: bool = False):
    """Copy a host batch (tensor or list) to `device`; from pinned memory the copy does not block the host."""
    if isinstance(x, (list, tuple)):
        return [_to_device(t, device, None, pin_memory) for t in x]
    if pin_memory:
        x = x.pin_memory()
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


def backward_and_step(loss: torch.Tensor, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, grad_clip: float) -> bool:
    """Backward through the (scaled) loss, clip the true gradients, step; False when the step was skipped.

    A step whose gradients hold inf or NaN is skipped in every precision: one such step would make
    every weight NaN for the rest of the run. In float16 the scaler skips it and lowers its scale
    (its early overflows are routine); in bfloat16 and float32 it is skipped here. Under DDP the
    gradients are already averaged, so every rank takes the same decision.
    """
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)))
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    return finite


def _memory_format(ndim: int, device: torch.device):
    """channels_last_3d: oneDNN's preferred layout for 3D convolutions on the CPU (about 10% faster in bfloat16)."""
    return torch.channels_last_3d if ndim == 3 and device.type == "cpu" else None


def train_fold(workdir: Path, configuration: str, fold: int | str, settings: TrainingSettings = TrainingSettings(),
               resume: bool = False, progress: bool = True) -> dict:
    """Train one fold; returns the final record (history, and the validation summary when run)."""
    workdir = Path(workdir)
    plans = Plans.load(workspace.plans_json(workdir))
    if configuration not in plans.configurations:
        raise TrainingError(f"configuration '{configuration}' is not in {workspace.plans_json(workdir)} "
                            f"(planned: {', '.join(plans.configurations)})")
    config = plans.configuration(configuration)
    data_dir = workspace.preprocessed_dir(workdir, config.data_identifier)
    case_ids = store.list_cases(data_dir)
    if not case_ids:
        raise TrainingError(f"{data_dir}: no preprocessed cases; run `autoseg plan` (preprocess step) first")
    stale = [c for c in case_ids if not is_current(data_dir, c, preprocessing_key(plans, configuration))]
    if stale:
        raise TrainingError(f"{data_dir}: {len(stale)} case(s) (e.g. {stale[0]}) were preprocessed with other plans; "
                         "run `autoseg plan DATASET_DIR -o WORKDIR --steps preprocess` first")
    # fold "all" needs no splits (and a dataset of fewer than 5 cases has none)
    splits = [] if fold == "all" else distributed.main_first(load_or_create_splits, workspace.splits_json(workdir),
                                                             case_ids)
    train_ids, val_ids = fold_cases(splits, fold, case_ids)
    out = workspace.fold_dir(workdir, configuration, fold)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "training_log.txt"
    main_process = distributed.is_main()

    def say(message: str) -> None:
        if main_process:
            log.info(message)
            with open(log_file, "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    device = distributed.process_device(choose_device(settings.device))
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    configure_cudnn(device)
    global_batch = settings.batch_size or config.batch_size
    batch_note = "" if global_batch == config.batch_size else f" (plan: {config.batch_size})"
    batch_size, oversample = distributed.batch_share(global_batch, settings.oversample_foreground,
                                                     distributed.rank(), distributed.world_size())

    # --- network, loss, optimizer -------------------------------------------------------------
    num_classes = plans.num_classes
    topology = plans.network_topology(configuration)
    network = build_unet(topology, deep_supervision=True).to(device)
    memory_format = _memory_format(topology.ndim, device)
    if memory_format is not None:
        network = network.to(memory_format=memory_format)
    scales = deep_supervision_scales(config.strides)
    batch_dice = config.batch_dice
    loss_weights = deep_supervision_weights(len(scales))
    sum_dice_terms = distributed.sum_with_gradient if distributed.is_distributed() and batch_dice else None
    region_labels = [r.labels for r in plans.regions]
    if region_labels:  # one sigmoid output per region: Dice + binary cross-entropy (nnU-Net v2's regions)
        loss = RegionDiceBCELoss(region_labels, batch_dice=batch_dice, sum_terms=sum_dice_terms,
                                 ignore_label=plans.ignore_label)
    else:
        loss = DiceCELoss(batch_dice=batch_dice, sum_terms=sum_dice_terms, ignore_label=plans.ignore_label)
    loss_fn = DeepSupervisionLoss(loss, loss_weights)
    optimizer = torch.optim.SGD(network.parameters(), lr=settings.initial_lr, momentum=settings.momentum,
                                nesterov=True, weight_decay=settings.weight_decay)
    amp_dtype = mixed_precision_dtype(device, settings.mixed_precision)
    autocast = autocast_context(device.type, amp_dtype)
    scaler = gradient_scaler(device.type, amp_dtype)
    pin_memory = pin_memory_for(device)

    # --- state: fresh or resumed ---------------------------------------------------------------
    start_epoch, best_ema, ema, history = 0, -1.0, None, []
    pretrained_note = None
    if resume:
        try:
            state = load_checkpoint(out / "checkpoint_latest.pt", map_location=device)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from None
        if state.configuration != configuration or state.optimizer_state is None or state.epoch is None:
            raise TrainingError(f"{out / 'checkpoint_latest.pt'} is not a training state of configuration "
                                f"{configuration} (it holds {state.configuration}); train afresh without --resume")
        network.load_state_dict(state.network_state)
        optimizer.load_state_dict(state.optimizer_state)
        if state.grad_scaler_state:  # empty when the run was not in float16
            scaler.load_state_dict(state.grad_scaler_state)
        start_epoch, best_ema, ema = state.epoch, state.best_ema_dice, state.ema_dice
        history = list(state.history)
        if state.epochs != settings.epochs:
            say(f"note: resuming a {state.epochs}-epoch schedule with --epochs {settings.epochs}; "
                "the learning-rate schedule follows the new length")
        say(f"resumed from epoch {start_epoch} (best EMA pseudo-Dice {best_ema:.4f})")
        if settings.pretrained:
            say("note: --pretrained is not loaded when resuming; the run continues from its own checkpoint")
    elif settings.pretrained:
        pretrained_note = load_pretrained_weights(network, settings.pretrained, plans.labels,
                                                  plans.to_json().get("regions"))
    if not resume and main_process:
        if (out / "checkpoint_latest.pt").exists():
            log.warning("%s holds an earlier run; starting afresh overwrites it (use --resume to continue it)", out)
        if log_file.exists():
            log_file.unlink()
        say(f"training {configuration} fold {fold}: {len(train_ids)} training and {len(val_ids)} validation cases, "
            f"{settings.epochs} epochs x {settings.iters_per_epoch} iterations, batch {global_batch}{batch_note}, "
            f"patch {list(config.patch_size)}, device {device}, "
            f"{'mixed precision' if autocast is not nullcontext else 'float32'}, {settings.workers} augmentation "
            f"worker(s), {torch.get_num_threads()} torch thread(s)")
        if pretrained_note:
            say(pretrained_note)
    if distributed.is_distributed():
        shares = [distributed.batch_share(global_batch, settings.oversample_foreground, r,
                                          distributed.world_size()) for r in range(distributed.world_size())]
        dice = "batch Dice terms summed over the ranks" if sum_dice_terms else "per-sample Dice"
        say(f"data parallel over {distributed.world_size()} processes ({distributed.backend_for(device.type)}): "
            f"batch per rank {[b for b, _ in shares]}, foreground fraction per rank "
            f"{[round(f, 2) for _, f in shares]}; {dice}")
    for head, weight in zip(network.decoder.heads, loss_weights):
        head.requires_grad_(weight > 0)  # the coarsest head gets no loss; DDP must not wait for its gradient
    model = distributed.wrap(network, device)
    forward, compile_note = training_forward(model, device, settings.compile, say)
    say(compile_note)

    def checkpoint_state(epoch: int) -> Checkpoint:
        return Checkpoint(configuration=configuration, fold=str(fold), epoch=epoch, epochs=settings.epochs,
                          network_state=network.state_dict(), optimizer_state=optimizer.state_dict(),
                          grad_scaler_state=scaler.state_dict(), best_ema_dice=best_ema, ema_dice=ema,
                          history=history, plans_configuration=config.to_json(),
                          labels=plans.to_json()["labels"], channel_names=list(plans.channel_names),
                          regions=plans.to_json().get("regions"))

    # --- data -----------------------------------------------------------------------------------
    patch = list(config.patch_size)
    read_patch = training_patch_size(patch)  # enlarged so rotation and scaling find data to fill the patch
    rotation, in_plane_only = rotation_for_patch(patch)
    mirror_axes = config.mirror_axes
    masked_channels = [n.channel for n in plans.normalization if n.use_nonzero_mask]
    elastic = elastic_for(config, settings.elastic)
    say(f"augmentation: patch {patch} read as {read_patch}, rotation up to +-{np.degrees(rotation[1]):.0f} degrees"
        f"{' (slab: in-plane only)' if in_plane_only else ''}, "
        f"{settings.augment_interpolation} image and {settings.augment_label_interpolation} label interpolation, "
        f"{settings.augment_scale_draw} scale draw, "
        f"{elastic.describe() if elastic else 'no elastic deformation'}, image 0 outside the non-zero mask in "
        f"channels {masked_channels}; loss: {'batch' if batch_dice else 'per-sample'} Dice + "
        + (f"binary cross-entropy over {len(region_labels)} regions" if region_labels else "cross-entropy"))
    data_seed = distributed.rank_seed(settings.seed + start_epoch)
    previous_dir, previous_labels = None, ()
    if config.previous_stage is not None:  # the cascade: the first stage's cross-validation predictions
        previous_dir = next_stage_dir(workdir, config.previous_stage, configuration)
        lacking = [c for c in train_ids + val_ids if not next_stage_file(previous_dir, c).is_file()]
        if lacking:
            raise TrainingError(f"{previous_dir}: no {config.previous_stage} prediction of {len(lacking)} case(s) "
                                f"(e.g. {lacking[0]}); {configuration} trains on {config.previous_stage}'s "
                                f"cross-validation predictions: train every fold of it first (`autoseg train "
                                f"WORKDIR --config {config.previous_stage} --fold K`, K = 0..4, with validation)")
        previous_labels = plans.foreground_labels
        say(f"cascade: input {plans.num_channels} image channel(s) + {len(previous_labels)} from "
            f"{config.previous_stage}'s predictions in {previous_dir}")
    train_loader = PatchLoader(data_dir, train_ids, read_patch, batch_size, oversample,
                               max(1, settings.workers), seed=data_seed, final_patch_size=patch,
                               previous_stage=previous_dir)
    train_batches = make_loader(train_loader, training_transforms(patch, mirror_axes=mirror_axes,
                                                                  deep_supervision_scales=scales,
                                                                  nonzero_mask_channels=masked_channels,
                                                                  elastic=elastic,
                                                                  image_order=AUGMENT_INTERPOLATIONS[
                                                                      settings.augment_interpolation],
                                                                  scale_draw=settings.augment_scale_draw,
                                                                  label_order=LABEL_INTERPOLATIONS[
                                                                      settings.augment_label_interpolation],
                                                                  previous_stage_labels=previous_labels),
                                settings.workers, seed=data_seed)
    val_batches = None
    if val_ids:
        val_loader = PatchLoader(data_dir, val_ids, patch, batch_size, oversample,
                                 max(1, settings.workers // 2), seed=data_seed + 1, previous_stage=previous_dir)
        val_batches = make_loader(val_loader, validation_transforms(scales, previous_labels),
                                  max(0, settings.workers // 2), seed=data_seed + 1)

    # --- the loop ---------------------------------------------------------------------------------
    try:
        for epoch in range(start_epoch, settings.epochs):
            t_epoch = time.perf_counter()
            lr = poly_lr(settings.initial_lr, epoch, settings.epochs, settings.lr_exponent)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            train_losses, wait, skipped = [], 0.0, 0
            iterator = range(settings.iters_per_epoch)
            if progress and main_process:
                from tqdm import tqdm
                iterator = tqdm(iterator, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="it", leave=False)
            for _ in iterator:
                t_wait = time.perf_counter()
                batch = next(train_batches)
                data = _to_device(batch["data"], device, memory_format, pin_memory)
                target = _to_device(batch["target"], device, None, pin_memory)
                wait += time.perf_counter() - t_wait
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(forward(data), target)
                if backward_and_step(loss, network, optimizer, scaler, settings.grad_clip):
                    train_losses.append(loss.item())
                else:
                    skipped += 1
            if skipped == settings.iters_per_epoch and not scaler.is_enabled():
                # Skipped steps changed nothing: the state in memory is still the end of the previous epoch.
                if main_process:
                    save_checkpoint(out / "checkpoint_latest.pt", checkpoint_state(epoch))
                raise TrainingError(
                    f"training {configuration} fold {fold} diverged: every step of epoch {epoch + 1} had inf or NaN "
                    f"gradients and was skipped; {out / 'checkpoint_latest.pt'} holds the state after epoch {epoch}"
                    + ("; try --resume --fp32" if amp_dtype is not None else ""))

            mean_loss = np.mean(train_losses) if train_losses else float("nan")
            train_loss = distributed.sum_over_ranks(mean_loss) / distributed.world_size()
            record = {"epoch": epoch + 1, "train_loss": float(train_loss), "lr": lr, "data_wait_s": wait,
                      "skipped_steps": skipped}
            if val_batches is not None:
                record.update(_validate_patches(network, val_batches, settings.val_iters, loss_fn, num_classes,
                                                device, memory_format, autocast, plans.ignore_label, region_labels))
                momentum = settings.ema_momentum
                ema = record["mean_dice"] if ema is None else momentum * ema + (1 - momentum) * record["mean_dice"]
                record["ema_dice"] = ema
            record["epoch_s"] = time.perf_counter() - t_epoch
            history.append(record)
            say(_format_record(record, settings.epochs, settings.iters_per_epoch))
            if val_batches is not None and ema > best_ema:
                best_ema = ema
                if main_process:
                    save_checkpoint(out / "checkpoint_best.pt", checkpoint_state(epoch + 1))
                say(f"  new best EMA pseudo-Dice {best_ema:.4f}: checkpoint_best.pt written")
            if main_process and ((epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == settings.epochs):
                save_checkpoint(out / "checkpoint_latest.pt", checkpoint_state(epoch + 1))
            if main_process:
                plot_progress(history, out / "progress.png",
                              [r.name for r in plans.regions] or [plans.labels[k] for k in plans.foreground_labels])
    finally:
        shutdown_loader(train_batches)
        if val_batches is not None:
            shutdown_loader(val_batches)

    result = {"configuration": configuration, "fold": str(fold), "epochs": settings.epochs, "history": history}
    if not main_process:
        return result
    save_checkpoint(out / "checkpoint_final.pt", checkpoint_state(settings.epochs))
    if val_ids and settings.validate_at_end:
        from autoseg.inference.settings import ComputeSettings
        from autoseg.training.validation import validate_fold

        network.deep_supervision = False
        result["validation"] = validate_fold(network, workdir, plans, configuration, val_ids, out / "validation",
                                             ComputeSettings(device, mixed_precision=settings.mixed_precision),
                                             save_probabilities=settings.save_probabilities, progress=progress)
        say("validation Dice per label: " + ", ".join(
            f"{plans.output_labels[int(k)]} {v['dice']:.4f}" for k, v in result["validation"]["mean"].items()
            if v["dice"] is not None))
    return result


@torch.inference_mode()
def _validate_patches(network, batches, iters: int, loss_fn, num_classes: int, device, memory_format, autocast,
                      ignore_label: int | None = None, regions: Sequence[Sequence[int]] = ()) -> dict:
    """Validation loss and pseudo-Dice per label, or per region where `regions` are given (sigmoid over 0.5), with
    TP/FP/FN pooled over all validation patches of all ranks; voxels of the ignore label count nowhere."""
    network.eval()
    losses = []
    scored = len(regions) if regions else num_classes - 1
    tp = np.zeros(scored)
    fp = np.zeros(scored)
    fn = np.zeros(scored)
    for _ in range(iters):
        batch = next(batches)
        data = _to_device(batch["data"], device, memory_format)
        target = _to_device(batch["target"], device)
        with autocast():
            outputs = network(data)
            losses.append(loss_fn(outputs, target).item())
        ref = target[0][:, 0]
        if regions:
            predicted, wanted = outputs[0] > 0, region_targets(target[0], regions)  # sigmoid > 0.5: logit > 0
            if ignore_label is not None:
                predicted = predicted & (target[0] != ignore_label)
            pairs = [(predicted[:, i], wanted[:, i]) for i in range(len(regions))]
        else:
            pred = outputs[0].argmax(1)
            if ignore_label is not None:
                pred = torch.where(ref == ignore_label, 0, pred)
            pairs = [(pred == c, ref == c) for c in range(1, num_classes)]
        for i, (p, r) in enumerate(pairs):
            tp[i] += (p & r).sum().item()
            fp[i] += (p & ~r).sum().item()
            fn[i] += (~p & r).sum().item()
    tp, fp, fn = distributed.sum_over_ranks(np.stack([tp, fp, fn]))
    val_loss = distributed.sum_over_ranks(np.mean(losses)) / distributed.world_size()
    denominator = 2 * tp + fp + fn
    dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)
    return {"val_loss": float(val_loss), "dice_per_label": [None if np.isnan(d) else float(d) for d in dice],
            "mean_dice": float(np.nanmean(dice)) if not np.all(np.isnan(dice)) else 0.0}


def _format_record(r: dict, epochs: int, iters: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train loss {r['train_loss']:.4f}"]
    if "val_loss" in r:
        dice = ", ".join("-" if d is None else f"{d:.3f}" for d in r["dice_per_label"])
        parts += [f"val loss {r['val_loss']:.4f}", f"pseudo-Dice [{dice}]", f"EMA {r['ema_dice']:.4f}"]
    parts += [f"lr {r['lr']:.2e}", f"{r['epoch_s']:.1f} s ({r['epoch_s'] / iters:.2f} s/it, "
              f"waiting for data {r['data_wait_s']:.1f} s)"]
    if r.get("skipped_steps"):
        parts.append(f"{r['skipped_steps']} step(s) skipped: inf/NaN gradients")
    return "  ".join(parts)
