"""Collecting a study's runs from raw BIDS + fMRIPrep derivatives (fcflow.bids)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fcflow.bids import collect_runs, parse_entities
from fcflow.errors import InputDataError

SPACE = "MNI152NLin2009cAsym"
GROUPS = ("placebo", "ketamine")
SESSIONS = ("baseline", "infusion")
TASKS = ("rest", "nback")


def _img(shape, affine=None, tr=2.0):
    data = np.zeros(shape, dtype=np.float32 if len(shape) == 4 else np.uint8)
    img = nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine)
    if len(shape) == 4:
        img.header.set_zooms((4.0, 4.0, 4.0, tr))
        img.header.set_xyzt_units("mm", "sec")
    return img


def make_tree(root: Path, subjects=("01", "02")) -> tuple[Path, Path]:
    deriv = root / "derivatives" / "fmriprep"
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tgroup\tage"]
    for i, sub in enumerate(subjects):
        rows.append(f"sub-{sub}\t{GROUPS[i % 2]}\t30")
        for ses in SESSIONS:
            raw = root / f"sub-{sub}" / f"ses-{ses}" / "func"
            der = deriv / f"sub-{sub}" / f"ses-{ses}" / "func"
            raw.mkdir(parents=True, exist_ok=True)
            der.mkdir(parents=True, exist_ok=True)
            for task in TASKS:
                base = f"sub-{sub}_ses-{ses}_task-{task}"
                (raw / f"{base}_bold.json").write_text(json.dumps({"RepetitionTime": 2.0, "TaskName": task}))
                if task == "nback":
                    (raw / f"{base}_events.tsv").write_text("onset\tduration\ttrial_type\n0\t20\t2back\n")
                space = f"{base}_space-{SPACE}_res-4"
                _img((7, 8, 9, 12)).to_filename(der / f"{space}_desc-preproc_bold.nii.gz")
                _img((7, 8, 9)).to_filename(der / f"{space}_desc-brain_mask.nii.gz")
                (der / f"{base}_desc-confounds_timeseries.tsv").write_text("trans_x\n" + "0\n" * 12)
                (der / f"{base}_desc-confounds_timeseries.json").write_text("{}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root, deriv


def _collect(root, deriv, **kwargs):
    options = dict(space=SPACE, group_column="group", groups=GROUPS, sessions=SESSIONS,
                   tasks_with_events=["nback"], tasks=TASKS)
    options.update(kwargs)
    return collect_runs(root, deriv, **options)


def _only(deriv: Path, pattern: str) -> Path:
    (path,) = sorted(deriv.rglob(pattern))
    return path


def test_parse_entities():
    entities, suffix, ext = parse_entities("sub-01_ses-24h_task-rest_space-X_res-2_desc-preproc_bold.nii.gz")
    assert entities == {"sub": "01", "ses": "24h", "task": "rest", "space": "X", "res": "2", "desc": "preproc"}
    assert (suffix, ext) == ("bold", ".nii.gz")


def test_collects_every_run_with_its_inputs(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    study = _collect(root, deriv)
    assert len(study.runs) == 2 * 2 * 2
    run = next(r for r in study.runs if r.name == "sub-02_ses-infusion_task-nback")
    assert run.group == "ketamine" and run.t_r == 2.0
    assert run.events_file.name == "sub-02_ses-infusion_task-nback_events.tsv"
    assert run.mask_file.name.endswith("_desc-brain_mask.nii.gz")
    assert run.confounds_json is not None
    assert all(r.events_file is None for r in study.runs if r.task == "rest")


def test_filters(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    study = _collect(root, deriv, participant_labels=["02"], session_labels=["infusion"], task_labels=["rest"])
    assert [r.name for r in study.runs] == ["sub-02_ses-infusion_task-rest"]


def _expect(root, deriv, pattern, **kwargs):
    with pytest.raises(InputDataError, match=pattern):
        _collect(root, deriv, **kwargs)


def test_missing_confounds(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    _only(deriv, "sub-01_ses-baseline_task-rest_desc-confounds_timeseries.tsv").unlink()
    _expect(root, deriv, r"sub-01_ses-baseline_task-rest: the confounds file .*missing")


def test_mask_on_another_grid(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    mask = _only(deriv, "sub-01_ses-baseline_task-rest_*brain_mask.nii.gz")
    _img((7, 8, 10)).to_filename(mask)
    _expect(root, deriv, r"brain mask .* is on another grid than the BOLD run \(mask shape \(7, 8, 10\)")


def test_other_space_only(tmp_path):
    root, deriv = make_tree(tmp_path / "bids", subjects=("01",))
    for path in deriv.rglob(f"*space-{SPACE}*"):
        path.rename(path.with_name(path.name.replace(f"space-{SPACE}", "space-T1w")))
    _expect(root, deriv, r"No \*_space-MNI152NLin2009cAsym.*Found other spaces: \['T1w'\]")


def test_tr_missing_and_disagreeing(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    sidecar = root / "sub-01" / "ses-baseline" / "func" / "sub-01_ses-baseline_task-rest_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.5}))
    _expect(root, deriv, r"RepetitionTime 2\.5 s in .*sub-01_ses-baseline_task-rest_bold\.json disagrees "
                         r"with the NIfTI header .* \(2\.0 s\)")
    sidecar.write_text(json.dumps({"TaskName": "rest"}))
    _expect(root, deriv, r"No RepetitionTime for sub-01_ses-baseline_task-rest_space")


def test_events_missing_for_a_task_that_needs_them(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    (root / "sub-02" / "ses-infusion" / "func" / "sub-02_ses-infusion_task-nback_events.tsv").unlink()
    _expect(root, deriv, r"sub-02_ses-infusion_task-nback: the events file .* is missing; the recipe's task 'nback'")


def test_participant_without_row_or_group(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    table = (root / "participants.tsv").read_text().splitlines()
    (root / "participants.tsv").write_text("\n".join(table[:2]) + "\n")
    _expect(root, deriv, r"sub-02 has data .* but no row in .*participants\.tsv")
    (root / "participants.tsv").write_text("\n".join([table[0], table[1], "sub-02\tn/a\t30"]) + "\n")
    _expect(root, deriv, r"sub-02 has no 'group' in .*participants\.tsv \(n/a\)")


def test_unknown_group_label(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    text = (root / "participants.tsv").read_text().replace("ketamine", "esketamine")
    (root / "participants.tsv").write_text(text)
    _expect(root, deriv, r"'group' must be one of the recipe's groups \['placebo', 'ketamine'\]\. "
                         r"Got \['esketamine'\] \(participants \['sub-02'\]\)")


def test_participant_listed_without_data_is_a_warning(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    with open(root / "participants.tsv", "a") as handle:
        handle.write("sub-03\tplacebo\t41\n")
    study = _collect(root, deriv)
    assert any("sub-03" in w for w in study.warnings)


def test_duplicate_runs(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    bold = _only(deriv, "sub-01_ses-baseline_task-rest_*preproc_bold.nii.gz")
    twin = bold.with_name(bold.name.replace("res-4", "res-2"))
    twin.write_bytes(bold.read_bytes())
    _expect(root, deriv, r"Two BOLD files for one run .*res-2.*res-4|Two BOLD files for one run .*res-4.*res-2")


def test_3d_bold_and_missing_derivatives(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    bold = _only(deriv, "sub-01_ses-baseline_task-rest_*preproc_bold.nii.gz")
    _img((7, 8, 9)).to_filename(bold)
    _expect(root, deriv, r"must be a 4D BOLD series\. Got shape \(7, 8, 9\)")
    _expect(root, tmp_path / "nowhere", r"derivatives folder .*nowhere does not exist: pass --derivatives")


def test_unknown_participant_filter(tmp_path):
    root, deriv = make_tree(tmp_path / "bids")
    _expect(root, deriv, r"--participant-label \['07'\]: no preprocessed BOLD", participant_labels=["07"])


def test_pybids_config_declares_every_custom_entity_and_names_round_trip():
    """fcflow's file names and its pybids configuration agree (issue 19): every entity fcflow adds is
    declared, bids_name orders stat before desc, and parse_entities reads back what bids_name wrote."""
    import json

    from fcflow.bids import parse_entities
    from fcflow.derivatives import CUSTOM_ENTITIES, PYBIDS_CONFIG, bids_label, bids_name

    config = json.loads(PYBIDS_CONFIG.read_text())
    assert {e["name"] for e in config["entities"]} == set(CUSTOM_ENTITIES)
    entities = {"desc": "correlation", "stat": "logpFWE", "inference": bids_label("cluster_mass"),
                "contrast": "ketamineMinusPlacebo", "seed": "pgACC", "ses": "infusionMinusBaseline",
                "task": "rest", "space": "MNI152NLin2009cAsym", "res": "2", "alpha": "0p05"}
    name = bids_name(entities, "statmap", ".nii.gz")
    assert name == ("ses-infusionMinusBaseline_task-rest_space-MNI152NLin2009cAsym_res-2_seed-pgACC_"
                    "contrast-ketamineMinusPlacebo_stat-logpFWE_inference-clusterMass_alpha-0p05_desc-correlation_"
                    "statmap.nii.gz")
    assert parse_entities(name) == (entities, "statmap", ".nii.gz")
    with pytest.raises(ValueError, match=r"BIDS labels hold letters and digits only; got \{'inference': 'cluster_mass'\}"):
        bids_name({**entities, "inference": "cluster_mass"}, "statmap", ".nii.gz")
