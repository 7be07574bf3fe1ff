"""Power of the variance-group settings on tests/test_grouplevel.py's synthetic study (exploration).

6 subjects per group, equal variances, a blob planted in the ketamine group at infusion; 500
permutations (sign flips with variance groups). Run from the repository root; writes its
studies under ./power_toy/ and the table beside this script.
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, "tests")
from test_grouplevel import _recipe, write_first_level

from fcflow.group.run import run_group_level

rows = []
for seed in (0, 1, 2):
    for label, kw in (("none", dict(variance_groups="none")), ("auto-brain", dict()), ("auto-voxel", dict(group_variances="voxel"))):
        root = Path(f"power_toy/s{seed}_{label}")
        if root.exists():
            import shutil; shutil.rmtree(root)
        truth = write_first_level(root, seed=seed)
        recipe = _recipe(primary="tfce", methods=["tfce", "maxt", "cluster_mass"], n_permutations=500, **kw)
        res = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"]), sep="\t", keep_default_na=False)
        r = res.query("session_contrast == 'infusion - baseline' and group_contrast == 'ketamine - placebo'").iloc[0]
        out = {}
        for m in ("tfce", "maxt", "cluster_mass"):
            f = truth["out"] / r["logp_fwe_map"].replace("inference-tfce", f"inference-{m}")
            logp = np.asarray(nib.load(f).dataobj)
            out[f"{m}_sig_voxels"] = int((logp > -np.log10(0.05)).sum())
        fam = np.asarray(nib.load(truth["out"] / r["logp_family_map"]).dataobj)
        rows.append({"seed": seed, "setting": label, "min_p_tfce": r["min_p"], "min_p_family_tfce": r["min_p_family"],
                     "family_tfce_sig_voxels": int((fam > -np.log10(0.05)).sum()), **out})
        print(rows[-1], flush=True)
pd.DataFrame(rows).to_csv("benchmarks/results/exploration/power_toy_study.tsv", sep="\t", index=False)
