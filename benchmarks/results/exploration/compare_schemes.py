"""Max-T / cluster / TFCE FWE of three schemes on pure noise (exploration, 250 permutations).

perm+v: variance groups, free permutation (PALM's free exchange with v); flip+v: sign flips
(OLS Freedman-Lane residuals at the time of the run); flip+t: sign flips, one common variance.
Usage from the repository root: python compare_schemes.py N_REPETITIONS 10/4/6 2.5
"""
import sys

import numpy as np

sys.path.insert(0, 'benchmarks')
from validate_fwe import INFERENCE, LEVELS, make_brain_mask, simulate_noise_maps

from fcflow.permutation import permutation_test
from fcflow.stats import make_group_design

n_rep = int(sys.argv[1]); ns = tuple(map(int, sys.argv[2].split('/'))); sdk = float(sys.argv[3])
mask = make_brain_mask((20, 24, 20))
groups = np.repeat(LEVELS, ns); sd = np.repeat([1, sdk, 1], ns).astype(np.float32)
design = make_group_design(groups, LEVELS)
configs = {"perm+v": dict(variance_groups=groups, scheme="permute", variance_estimate="voxel"), "flip+v": dict(variance_groups=groups, scheme="sign_flip", variance_estimate="voxel", residuals="freedman_lane"),
           "flip+t": dict(scheme="sign_flip")}
hits = {(c, i): 0 for c in configs for i in INFERENCE}
for rep, child in enumerate(np.random.SeedSequence(123).spawn(n_rep)):
    rng = np.random.default_rng(child)
    data = simulate_noise_maps(rng, groups.size, mask, 1.5) * sd[:, None]
    for c, kw in configs.items():
        r = permutation_test(data, design, "ketamine - placebo", n_permutations=250, random_seed=rep, mask=mask, n_jobs=1, **kw)
        for i in INFERENCE:
            hits[(c, i)] += r.logp_fwe[i].max() >= -np.log10(0.05) - 1e-9
print(n_rep, ns, sdk)
for k, v in hits.items(): print(k, v, v / n_rep)
