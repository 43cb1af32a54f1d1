"""plans.json read as typed records: every problem is a PlanError naming the file, the key and the fix."""

import json

import pytest
from test_planning import HIPPOCAMPUS, make_fingerprint

from autoseg import workspace
from autoseg.cli import main
from autoseg.planning.planner import plan_experiment
from autoseg.planning.plans import PlanError, Plans

MICROSCOPY = make_fingerprint((1, 360, 360), (999.0, 1.0, 1.0), 40, channels=("R", "G", "B"), labels=2)


def _plans_json() -> dict:
    return plan_experiment(HIPPOCAMPUS).to_json()


def _write_without_patch_size(path):
    data = _plans_json()
    del data["configurations"]["3d_fullres"]["patch_size"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_a_missing_patch_size_names_the_file_and_the_key(tmp_path):
    path = _write_without_patch_size(tmp_path / "plans.json")
    with pytest.raises(PlanError) as raised:
        Plans.load(path)
    assert str(path) in str(raised.value) and "configurations.3d_fullres.patch_size" in str(raised.value)


def test_train_on_a_workspace_with_a_broken_plan_is_a_clean_error(tmp_path, capsys):
    work = tmp_path / "ws"
    _write_without_patch_size(workspace.plans_json(work))
    assert main(["train", str(work), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "patch_size" in err and "Traceback" not in err


def _set_batch_size(data):
    data["configurations"]["3d_fullres"]["batch_size"] = "two"


def _patch_not_divisible_by_strides(data):
    data["configurations"]["3d_fullres"]["patch_size"][-1] += 4  # 40 -> 44, the strides' product is 8


def _normalize_a_channel_that_is_not_there(data):
    data["normalization"].append({**data["normalization"][0], "channel": 1})


def _default_not_planned(data):
    data["default_configuration"] = "3d_lowres"


@pytest.mark.parametrize("edit, key", [
    (_set_batch_size, "configurations.3d_fullres.batch_size"),
    (_patch_not_divisible_by_strides, "configurations.3d_fullres.patch_size"),
    (_normalize_a_channel_that_is_not_there, "normalization"),
    (_default_not_planned, "default_configuration"),
], ids=["wrong-type", "patch-vs-strides", "normalization-channels", "default-missing"])
def test_wrong_types_and_inconsistent_plans_name_the_key(edit, key):
    data = _plans_json()
    edit(data)
    with pytest.raises(PlanError, match=f"plans.json: {key} .*autoseg plan"):
        Plans.from_json(data, "plans.json")


def test_plans_of_an_older_format_are_refused_with_the_command_to_rerun():
    data = _plans_json()
    data["format_version"] = 1
    with pytest.raises(PlanError, match="format_version 1 .*rerun `autoseg plan`"):
        Plans.from_json(data)


@pytest.mark.parametrize("fingerprint", [HIPPOCAMPUS, MICROSCOPY], ids=["3d", "2d"])
def test_to_json_round_trips(fingerprint):
    plans = plan_experiment(fingerprint)
    assert Plans.from_json(plans.to_json()) == plans
    assert json.loads(json.dumps(plans.to_json())) == plans.to_json()  # plain JSON, as written to disk


def test_resolve_configurations_gives_the_default_or_names_the_planned_ones():
    plans = plan_experiment(HIPPOCAMPUS)
    assert plans.resolve_configurations(None) == ("3d_fullres",) == (plans.default_configuration,)
    with pytest.raises(PlanError, match="nope") as raised:
        plans.resolve_configurations(["nope"])
    assert all(name in str(raised.value) for name in plans.configurations)
