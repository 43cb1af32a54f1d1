"""Start training from another model's weights (fine-tuning), as nnU-Net's `-pretrained_weights` does.

Every tensor of the network must come from the checkpoint with the same shape, which holds when the
target workspace was planned with the source's plans (`autoseg plan --plans-from SOURCE`). The
segmentation heads are the exception: they are taken over only when both models segment the same
labels, and otherwise keep their fresh initialization.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from autoseg.errors import AutosegError
from autoseg.model_files import CheckpointError, load_checkpoint

HEAD_PREFIX = "decoder.heads."


class PretrainedWeightsError(AutosegError):
    """Weights that do not fit the network to train; the message names the tensors and the fix."""


def load_pretrained_weights(network: nn.Module, path: Path | str, labels: dict[int, str],
                            regions: list[dict] | None = None) -> str:
    """Copy the checkpoint's weights into `network` (in place); returns one line saying what was taken. The
    segmentation heads are kept only for the same labels and the same regions (plans.json's "regions")."""
    path = Path(path)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise PretrainedWeightsError(f"--pretrained: {exc}") from None
    theirs, ours = checkpoint.network_state, network.state_dict()
    their_labels = None if checkpoint.labels is None else {int(k): v for k, v in checkpoint.labels.items()}
    same_labels = (their_labels == {int(k): v for k, v in labels.items()}
                   and (checkpoint.regions or None) == (regions or None))
    body = [k for k in ours if not k.startswith(HEAD_PREFIX)]
    problems = [f"{k} missing" for k in body if k not in theirs]
    problems += [f"{k} is {list(theirs[k].shape)} there, {list(ours[k].shape)} here" for k in body
                 if k in theirs and theirs[k].shape != ours[k].shape]
    problems += [f"{k} is not in this network" for k in theirs if k not in ours and not k.startswith(HEAD_PREFIX)]
    if problems:
        raise PretrainedWeightsError(
            f"{path}: its network is not this one ({len(problems)} difference(s): {'; '.join(problems[:4])}); "
            "plan this dataset with `autoseg plan DATASET -o WORKDIR --plans-from SOURCE_WORKDIR` so both networks "
            "are the same")
    heads = [k for k in ours if k.startswith(HEAD_PREFIX)]
    heads_fit = same_labels and all(k in theirs and theirs[k].shape == ours[k].shape for k in heads)
    taken = {k: theirs[k] for k in body + (heads if heads_fit else [])}
    network.load_state_dict(taken, strict=False)
    why = ("the same labels" if heads_fit else
           f"re-initialised, the labels differ ({_names(their_labels)} there, {_names(labels)} here)")
    return (f"initialised from {path} ({checkpoint.configuration or 'a model'} fold {checkpoint.fold}, epoch "
            f"{checkpoint.epoch}): {len(body)} tensors; segmentation heads {why}")


def _names(labels: dict | None) -> str:
    return "unknown" if labels is None else ", ".join(str(v) for k, v in sorted(labels.items()))
