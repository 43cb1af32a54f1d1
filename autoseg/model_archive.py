"""A trained model as one portable file: export a workspace's chosen folds to a zip, import it back.

The archive (format described in docs/model_archive.md) holds what prediction needs and nothing of the
training data: plans.json (which carries the normalization statistics), the network weights of the
chosen folds (optimizer state and training history are dropped), postprocessing.json when the workspace
has one, a model card (model_card.json and model_card.md) and manifest.json, which lists every other
member with its size and SHA-256. `import_model` refuses an archive whose members do not match its
manifest, and extracts into a scratch folder that is renamed into place only when all is verified,
so the target folder is either a complete workspace or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Sequence

import numpy as np
import torch

from autoseg import __version__, workspace
from autoseg.atomic import atomic_path, read_json
from autoseg.errors import AutosegError
from autoseg.model_files import (
    PREDICTION_KEYS,
    CheckpointError,
    checkpoint_path,
    file_sha256,
    fold_names,
    load_checkpoint,
)
from autoseg.planning.plans import PlanError, Plans

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINT_NAME = "checkpoint_final.pt"  # every exported fold's weights, whichever checkpoint they came from
_CHUNK = 1 << 20


class ModelArchiveError(AutosegError):
    """An archive that cannot be written or trusted; the message names the archive, the member and the fix."""


# ---------------------------------------------------------------------------------------------
# Export


def export_model(workdir: Path | str, path: Path | str, configurations: Sequence[str] | None = None,
                 folds: Sequence[int | str] | None = None, checkpoint: str = "final") -> dict:
    """Write the chosen configurations' folds of a workspace to one zip at `path`; returns the manifest.

    `configurations=None`: the configurations postprocessing.json was decided for (the cross-validation
    winner), else the plans' default_configuration. `folds=None`: every fold folder holding the checkpoint.
    `checkpoint` is "final" (falling back to latest, as prediction does), "best" or "latest"; whichever it
    is, the fold's weights are stored as checkpoint_final.pt so the imported model predicts by default."""
    workdir, path = Path(workdir), Path(path)
    plans = Plans.load(workspace.plans_json(workdir))
    rules_path = workspace.postprocessing_json(workdir)
    rules = read_json(rules_path) if rules_path.is_file() else None
    try:
        configurations = list(plans.resolve_configurations(configurations or (rules or {}).get("configuration")))
        # a cascade's first stage travels with it (its folds as chosen), without becoming an ensemble member
        stages = plans.previous_stages(configurations)
        chosen = {name: fold_names(workdir, name, folds, checkpoint) for name in configurations + stages}
    except (PlanError, CheckpointError) as exc:
        raise ModelArchiveError(f"{workdir}: {exc}; choose with --config and --folds") from None
    entries: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        def add(name: str, data: bytes) -> None:  # one member at a time: a fold's weights are not all held at once
            method = zipfile.ZIP_STORED if name.endswith(".pt") else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=method)
            entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        for name, names in chosen.items():
            for fold in names:
                source = checkpoint_path(workdir, name, fold, checkpoint)
                try:
                    state = load_checkpoint(source)
                except CheckpointError as exc:
                    raise ModelArchiveError(str(exc)) from None
                if state.configuration is None:
                    state = replace(state, configuration=name)
                buffer = io.BytesIO()
                torch.save(state.to_dict(PREDICTION_KEYS), buffer)
                sources[f"{name}/fold_{fold}"] = {"checkpoint": source.name, "epoch": state.epoch,
                                                  "epochs": state.epochs}
                del state
                add(f"models/{name}/fold_{fold}/{CHECKPOINT_NAME}", buffer.getvalue())

        # The exported configurations only; an imported workspace predicts without --config.
        add("plans.json", _json_bytes(plans.with_configurations(configurations + stages).to_json()))
        if rules is not None:
            add("postprocessing.json", rules_path.read_bytes())
        card = model_card(workdir, plans, chosen, checkpoint, sources)
        add("model_card.json", _json_bytes(card))
        add("model_card.md", format_model_card(card).encode())
        manifest = {"format_version": FORMAT_VERSION, "kind": "autoseg model", "autoseg_version": __version__,
                    "created": card["created"], "configurations": configurations, "folds": chosen,
                    "source_checkpoint": checkpoint, "members": entries}
        archive.writestr(MANIFEST, _json_bytes(manifest), compress_type=zipfile.ZIP_DEFLATED)
    log.info("wrote %s: %s (%.1f MB)", path, ", ".join(f"{c} folds {' '.join(f)}" for c, f in chosen.items()),
             path.stat().st_size / 1e6)
    return manifest


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# Model card


def model_card(workdir: Path, plans: Plans, folds: dict[str, list[str]], checkpoint: str,
               sources: dict[str, dict]) -> dict:
    """What a user of the model should know: labels, channels, training data, cross-validation Dice.

    The training data is summarised (case count, spacings, shapes); case ids and dataset paths are left
    out. A workspace that was itself imported keeps the training summary of its own model card."""
    previous = _read_optional(workdir / "model_card.json") or {}
    return {
        "format_version": FORMAT_VERSION,
        "name": plans.dataset_name,
        "autoseg_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labels": {str(k): v for k, v in plans.output_labels.items()},  # the ids its label maps hold
        **({"regions": [r.to_json() for r in plans.regions]} if plans.regions else {}),
        "channel_names": list(plans.channel_names),
        "normalization": [{"channel": n.name, "scheme": n.scheme} for n in plans.normalization],
        "configurations": {c: {"folds": f, "target_spacing": list(plans.configuration(c).spacing),
                               "patch_size": list(plans.configuration(c).patch_size)} for c, f in folds.items()},
        "source_checkpoint": checkpoint,
        "checkpoints": sources,
        "training_data": _training_data(workdir) or previous.get("training_data"),
        "cross_validation": _cross_validation(workdir, folds) or previous.get("cross_validation"),
        "postprocessing": _read_optional(workspace.postprocessing_json(workdir)),
    }


def _read_optional(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable, left out of the model card", path)
        return None


def _training_data(workdir: Path) -> dict | None:
    dataset = _read_optional(workspace.dataset_json(workdir)) or {}
    fingerprint = _read_optional(workspace.fingerprint_json(workdir)) or {}
    if not dataset and not fingerprint:
        return None
    summary = {k: dataset[k] for k in ("name", "layout", "file_ending", "num_cases") if k in dataset}
    cases = fingerprint.get("cases") or []
    if cases:
        spacings = np.array([c["spacing"] for c in cases], dtype=float)
        shapes = np.array([c["shape"] for c in cases], dtype=float)
        summary.update(num_cases=len(cases),
                       median_spacing=[round(float(v), 4) for v in np.median(spacings, axis=0)],
                       min_spacing=[round(float(v), 4) for v in spacings.min(axis=0)],
                       max_spacing=[round(float(v), 4) for v in spacings.max(axis=0)],
                       median_shape=[int(v) for v in np.median(shapes, axis=0)],
                       min_shape=[int(v) for v in shapes.min(axis=0)],
                       max_shape=[int(v) for v in shapes.max(axis=0)])
    if fingerprint.get("channel_kinds"):
        summary["channel_kinds"] = fingerprint["channel_kinds"]
    return summary


def _cross_validation(workdir: Path, folds: dict[str, list[str]]) -> dict | None:
    """Pooled cross-validation Dice (`autoseg crossval`) and each exported fold's own validation Dice."""
    result: dict = {}
    pooled = _read_optional(workspace.crossval_dir(workdir) / "summary.json")
    if pooled:
        keys = ("num_cases", "mean_dice", "foreground_mean_dice", "missing_folds")
        result["pooled"] = {c: {k: r.get(k) for k in keys}
                            for c, r in pooled.get("configurations", {}).items() if c in folds}
        ensemble = pooled.get("ensembles", {}).get("+".join(folds))
        if ensemble:
            result["pooled"]["+".join(folds)] = {k: ensemble.get(k) for k in keys[:3]}
        result["best"] = pooled.get("best")
    per_fold = {}
    for c, names in folds.items():
        for fold in names:
            summary = _read_optional(workspace.fold_dir(workdir, c, fold) / "validation" / "summary.json")
            if summary:
                per_fold[f"{c}/fold_{fold}"] = {
                    "num_cases": summary.get("num_cases"),
                    "mean_dice": {k: m.get("dice") for k, m in summary.get("mean", {}).items()},
                    "foreground_mean_dice": summary.get("foreground_mean_dice")}
    if per_fold:
        result["folds"] = per_fold
    return result or None


def format_model_card(card: dict) -> str:
    """The model card as Markdown for people."""
    labels = card["labels"]

    def dice_row(name: str, r: dict) -> str:
        values = [r.get("mean_dice", {}).get(k) for k in labels if k != "0"]
        cells = " | ".join("-" if v is None else f"{v:.4f}" for v in values)
        return f"| {name} | {r.get('num_cases', '-')} | {cells} |"

    lines = [f"# Model card: {card.get('name') or 'autoseg model'}", "",
             f"Exported by autoseg {card['autoseg_version']} on {card['created']}.", "",
             "## Labels", "", "| id | name |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in labels.items()]
    if card.get("regions"):
        lines += ["", "Region-based: each region is one output; a label map holds, per voxel, the id of the last "
                  "region (in this order) that contains it.", "", "| region | written as | label ids it unites |",
                  "|---|---|---|"]
        lines += [f"| {r['name']} | {r['written_as']} | {', '.join(str(v) for v in r['labels'])} |"
                  for r in card["regions"]]
    lines += ["", "## Input channels", "", "| channel | name | normalization |", "|---|---|---|"]
    schemes = {n["channel"]: n["scheme"] for n in card.get("normalization", [])}
    lines += [f"| {i} | {name} | {schemes.get(name, '-')} |" for i, name in enumerate(card["channel_names"])]
    lines += ["", "## Networks", "", "| configuration | folds | target spacing | patch size |", "|---|---|---|---|"]
    for c, r in card["configurations"].items():
        lines.append(f"| {c} | {' '.join(r['folds'])} | {r['target_spacing']} | {r['patch_size']} |")
    epochs = ", ".join(f"{k}: epoch {v.get('epoch')}" for k, v in card["checkpoints"].items())
    lines += ["", f"Weights from each fold's `{card['source_checkpoint']}` checkpoint ({epochs})."]
    data = card.get("training_data")
    lines += ["", "## Training data", ""]
    if data:
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in data.items()]
    else:
        lines.append("Not recorded (the workspace had no dataset.json or fingerprint.json).")
    cv = card.get("cross_validation")
    lines += ["", "## Validation Dice", ""]
    if cv:
        header = "| model | cases | " + " | ".join(f"{v} ({k})" for k, v in labels.items() if k != "0") + " |"
        lines += [header, "|" + "---|" * (2 + len(labels) - 1)]
        lines += [dice_row(f"{name} (cross-validation, pooled"
                           + (f"; folds {r['missing_folds']} missing)" if r.get("missing_folds") else ")"), r)
                  for name, r in cv.get("pooled", {}).items()]
        lines += [dice_row(name, r) for name, r in cv.get("folds", {}).items()]
        if cv.get("best"):
            lines += ["", f"Best model in cross-validation: {' + '.join(cv['best'])}."]
    else:
        lines.append("Not recorded (no validation results in the workspace).")
    pp = card.get("postprocessing")
    lines += ["", "## Postprocessing", ""]
    lines.append(f"Rules decided for {' + '.join(pp.get('configuration') or [])}: largest foreground component "
                 f"{pp.get('foreground_largest_component')}, largest component per label "
                 f"{pp.get('largest_component_labels')}." if pp else "None.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Import


def read_manifest(path: Path | str) -> dict:
    """The archive's manifest, after checking the archive's structure (no member is extracted)."""
    path = Path(path)
    with _open_zip(path) as archive:
        return _checked_manifest(path, archive)


def import_model(path: Path | str, target_dir: Path | str) -> dict:
    """Verify the archive and extract it into `target_dir` (absent or empty), a workspace `autoseg predict`
    accepts; returns the manifest. Nothing is left at `target_dir` when a check fails."""
    path, target = Path(path), Path(target_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelArchiveError(f"{target}: already exists and is not an empty folder; choose a new folder for the "
                                f"model")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _open_zip(path) as archive:
            manifest = _checked_manifest(path, archive)
            for name, expected in manifest["members"].items():
                _extract_verified(path, archive, name, expected, scratch)
            (scratch / MANIFEST).write_bytes(archive.read(MANIFEST))
        _check_weights(path, scratch, manifest)
        try:
            if target.exists():
                target.rmdir()
            os.rename(scratch, target)
        except OSError as exc:  # e.g. another process filled the folder meanwhile
            raise ModelArchiveError(f"{target}: the verified model could not be moved into place ({exc}); "
                                    "choose a new, empty folder") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("imported %s into %s", path, target)
    return manifest


def model_workspace(path: Path | str, cache_root: Path | str) -> tuple[Path, dict]:
    """A verified workspace of the archive under `cache_root/.autoseg_model_<hash>`, extracted once and reused
    while the archive is unchanged. On reuse the folder must hold exactly the archive's files with the manifest's
    SHA-256, since prediction loads whatever plans, rules and checkpoints it finds there; otherwise the archive
    is extracted again and swapped in."""
    path, cache_root = Path(path), Path(cache_root)
    if not path.is_file():
        raise ModelArchiveError(f"{path}: model archive not found")
    target = cache_root / f".autoseg_model_{_sha256_of(path)[:16]}"
    manifest, expected = _extracted_files(path)
    damaged = target.exists() or target.is_symlink()
    if damaged:
        problem = _extraction_problem(path, target, expected)
        if problem is None:
            return target, manifest
        log.warning("%s; extracting the model again", problem)
    cache_root.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".tmp", dir=cache_root))
    try:
        import_model(path, fresh)
        if not _swap_in(fresh, target, replace=damaged):  # a parallel run (--num-parts) put its extraction there first
            problem = _extraction_problem(path, target, expected)
            if problem is not None:
                raise ModelArchiveError(f"{problem}; delete {target} and run again")
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return target, manifest


def _extracted_files(path: Path) -> tuple[dict, dict[str, str]]:
    """The archive's checked manifest, and the SHA-256 of every file `import_model` writes (manifest.json too)."""
    with _open_zip(path) as archive:
        manifest = _checked_manifest(path, archive)
        own = hashlib.sha256(archive.read(MANIFEST)).hexdigest()
    return manifest, {**{name: m["sha256"] for name, m in manifest["members"].items()}, MANIFEST: own}


def _extraction_problem(path: Path, target: Path, expected: dict[str, str]) -> str | None:
    """Why `target` is not an intact extraction of `path`: a link, or a file or folder that is extra, missing or
    changed (an extra fold folder or checkpoint would be loaded by prediction); None when intact."""
    if target.is_symlink() or not target.is_dir():
        return f"{target}: not a folder extracted from {path}"
    folders = {PurePosixPath(name).parent.as_posix() for name in expected}
    folders |= {parent.as_posix() for name in folders for parent in PurePosixPath(name).parents}
    for root, dirs, files in os.walk(target):
        for entry in dirs + files:
            found = Path(root, entry)
            name = found.relative_to(target).as_posix()
            if found.is_symlink() or (name not in folders if entry in dirs else name not in expected):
                return f"{found}: not in {path}, and prediction could load it"
    for name, sha256 in expected.items():
        digest = _sha256_of(target / name)
        if digest != sha256:
            return f"{target / name}: {'missing' if digest is None else 'changed'} since it was extracted from {path}"
    return None


def _swap_in(fresh: Path, target: Path, replace: bool) -> bool:
    """Rename `fresh` to `target` (with `replace`, moving the damaged `target` aside first), so `target` is never
    half written; False when another run's extraction took `target` meanwhile."""
    stale = fresh.with_suffix(".stale")  # unique, as `fresh` is
    try:
        if replace:
            os.rename(target, stale)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ModelArchiveError(f"{target}: cannot be replaced by a fresh extraction ({exc}); delete it and run "
                                "again") from None
    try:
        os.rename(fresh, target)
        return True
    except OSError:
        return False
    finally:
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ModelArchiveError(f"{path}: model archive not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelArchiveError(f"{path}: not a readable zip archive ({exc}); export the model again "
                                "with `autoseg export-model`") from None


def _checked_manifest(path: Path, archive: zipfile.ZipFile) -> dict:
    """Every member name safe, the manifest present and of a known version, members and manifest agreeing."""
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    for name in [info.filename.rstrip("/") for info in archive.infolist()]:
        problem = _unsafe_name(name)
        if problem:
            raise ModelArchiveError(f"{path}: member {name!r} {problem}; the archive is refused (it could write "
                                    "outside the target folder)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelArchiveError(f"{path}: member {duplicates[0]!r} appears more than once; the archive is refused")
    if MANIFEST not in names:
        raise ModelArchiveError(f"{path}: member {MANIFEST} missing; not an autoseg model archive "
                                "(export one with `autoseg export-model`)")
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise ModelArchiveError(f"{path}: member {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ModelArchiveError(f"{path}: member {MANIFEST}: format_version {version!r} is not {FORMAT_VERSION}, "
                                f"the one autoseg {__version__} reads; use the autoseg version that exported it "
                                "or export the model again")
    members = manifest.get("members")
    if not isinstance(members, dict) or not all(isinstance(m, dict) and {"size", "sha256"} <= set(m)
                                                for m in members.values()):
        raise ModelArchiveError(f"{path}: member {MANIFEST} has no valid member list")
    for name in members:
        problem = _unsafe_name(name) or ("is reserved" if name == MANIFEST else None)
        if problem:
            raise ModelArchiveError(f"{path}: member {name!r} listed in {MANIFEST} {problem}; the archive is refused")
    for required in ("plans.json",):
        if required not in members:
            raise ModelArchiveError(f"{path}: member {required} not listed in {MANIFEST}; the archive is incomplete")
    present = set(names) - {MANIFEST}
    missing = sorted(set(members) - present)
    if missing:
        raise ModelArchiveError(f"{path}: member {missing[0]} missing (listed in {MANIFEST}); the archive is "
                                "incomplete or was altered: export the model again")
    extra = sorted(present - set(members))
    if extra:
        raise ModelArchiveError(f"{path}: member {extra[0]} is not listed in {MANIFEST}; the archive was altered: "
                                "export the model again")
    for c, folds in (manifest.get("folds") or {}).items():
        for fold in folds:
            name = f"models/{c}/fold_{fold}/{CHECKPOINT_NAME}"
            if name not in members:
                raise ModelArchiveError(f"{path}: member {name} missing (the manifest names fold {fold} of {c})")
    return manifest


def _unsafe_name(name: str) -> str | None:
    """Why a member name could escape the extraction folder, or None when it is a plain relative path."""
    if not name:
        return "has an empty name"
    if "\\" in name or PureWindowsPath(name).drive or name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is an absolute path"
    if any(part in ("..", ".", "") for part in name.split("/")):
        return "points outside the target folder ('..')" if ".." in name.split("/") else "is not a plain relative path"
    return None


def _extract_verified(path: Path, archive: zipfile.ZipFile, name: str, expected: dict, folder: Path) -> None:
    info = archive.getinfo(name)
    if info.file_size != expected["size"]:
        raise ModelArchiveError(f"{path}: member {name} holds {info.file_size} bytes, the manifest says "
                                f"{expected['size']}; the archive was altered: export the model again")
    out = folder / name
    if not out.resolve().is_relative_to(folder.resolve()):
        raise ModelArchiveError(f"{path}: member {name!r} points outside the target folder; the archive is refused")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with archive.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a CRC error or truncated data
        raise ModelArchiveError(f"{path}: member {name} cannot be read ({exc}); the archive is damaged") from None
    if digest.hexdigest() != expected["sha256"]:
        raise ModelArchiveError(f"{path}: member {name}: SHA-256 does not match the manifest; the archive was "
                                "altered or damaged: export the model again")


def _check_weights(path: Path, folder: Path, manifest: dict) -> None:
    """plans.json is readable plans naming the exported configurations; each fold's weights load with
    weights_only=True and belong to their configuration."""
    try:
        plans = Plans.load(folder / "plans.json")
    except PlanError as exc:
        raise ModelArchiveError(f"{path}: member plans.json: {exc}") from None
    missing = [c for c in manifest.get("folds") or {} if c not in plans.configurations]
    if missing:
        raise ModelArchiveError(f"{path}: member plans.json has no configuration {', '.join(missing)}, which the "
                                f"manifest exports")
    for c, folds in (manifest.get("folds") or {}).items():
        for fold in folds:
            name = f"models/{c}/fold_{fold}/{CHECKPOINT_NAME}"
            try:
                state = load_checkpoint(folder / name)
            except CheckpointError as exc:
                raise ModelArchiveError(f"{path}: member {name}: {exc}") from None
            if state.configuration not in (None, c):
                raise ModelArchiveError(f"{path}: member {name}: not the weights of configuration {c}")


def _sha256_of(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None
