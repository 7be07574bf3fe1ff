"""ter Braak vs Freedman-Lane residuals with sign flips (exploration; stopped after 75 repetitions).

ter Braak is emulated by handing the engine the full model's residuals (their FL residuals are
themselves) and the observed statistic from a separate call. Usage from the repository root:
python compare_ter_braak.py 300 10/4/6 2.5 1 tB+flip+v,tB+flip+t
"""
import sys

import numpy as np

sys.path.insert(0, 'benchmarks')
from validate_fwe import LEVELS, make_brain_mask, simulate_noise_maps

from fcflow.permutation import permutation_test
from fcflow.stats import make_group_design

n_rep = int(sys.argv[1]); ns = tuple(map(int, sys.argv[2].split('/'))); sdk = float(sys.argv[3]); seed = int(sys.argv[4]); which = sys.argv[5].split(',')
mask = make_brain_mask((20, 24, 20))
groups = np.repeat(LEVELS, ns); sd = np.repeat([1, sdk, 1], ns).astype(np.float32)
design = make_group_design(groups, LEVELS); M = design.to_numpy()
R = np.eye(len(groups)) - M @ np.linalg.pinv(M)
INF = ("maxt", "tfce", "cluster_mass")
allc = {"tB+flip+v": dict(variance_groups=groups, residuals="freedman_lane"), "tB+flip+t": dict(), "FL+flip+v": dict(variance_groups=groups, residuals="freedman_lane", fl=True), "FL+flip+t": dict(fl=True)}
configs = {k: allc[k] for k in which}
hits = {(c, i): 0 for c in configs for i in INF}
for rep, child in enumerate(np.random.SeedSequence(seed).spawn(n_rep)):
    rng = np.random.default_rng(child)
    data = simulate_noise_maps(rng, groups.size, mask, 1.5) * sd[:, None]
    for c, kw in configs.items():
        kw = dict(kw); fl = kw.pop("fl", False)
        obs = permutation_test(data, design, "ketamine - placebo", n_permutations=200 if fl else 1, random_seed=rep, mask=mask, n_jobs=1, scheme="sign_flip", inference=INF, **kw)
        if fl:
            for i in INF: hits[(c, i)] += obs.logp_fwe[i].max() >= -np.log10(0.05) - 1e-9
            continue
        null = permutation_test((R @ data).astype(np.float32), design, "ketamine - placebo", n_permutations=200, random_seed=rep, mask=mask, n_jobs=1, scheme="sign_flip", inference=INF, **kw)
        for i in INF:
            o = obs.null_max[i][0]; nm = null.null_max[i][1:]
            p = (1 + np.sum(nm >= o * (1 - 1e-6))) / (len(nm) + 1)
            hits[(c, i)] += p <= 0.05
    if (rep + 1) % 25 == 0:
        print(rep + 1, {k: int(v) for k, v in hits.items()}, flush=True)
print(n_rep, ns, sdk)
for k, v in hits.items(): print(k, v, v / n_rep)
