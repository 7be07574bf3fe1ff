"""Group level: from first-level seed-to-voxel maps to group x session inference and reports.

Four modules, in the order the data flow: :mod:`fcflow.group.inputs` (which maps enter, read
once), :mod:`fcflow.group.inference` (session analyses, designs, tests; no file I/O),
:mod:`fcflow.group.outputs` (every file of ``group/``) and :mod:`fcflow.group.run` (the plan and
the units of work that tie them together).

:func:`plan_group_level` checks the inputs and lists the units of work, one per task x measure x
seed x session analysis; :func:`run_session_analysis` runs one unit; :func:`finish_group_level`
writes ``results.tsv``. ``fcflow BIDS_DIR OUTPUT_DIR group --recipe RECIPE`` runs them as a nipype
workflow (:mod:`fcflow.workflows.group`: one node, or SLURM job, per unit); :func:`run_group_level`
runs the same functions one after the other in this process. For every task x measure x seed:

1. finds the first-level maps and the runs' QC tables in OUTPUT_DIR
   (:func:`collect_first_level`). The map that enters is the Fisher z map (``stat-z``) for
   ``correlation`` (rest) and ``background`` (task), and the gPPI ``beta`` of each of the task's
   condition contrasts (``desc-gppi2backMinus0back``; of each condition when the task has no
   condition contrast). Excluded runs have no map and are skipped;
2. reads every map once (:func:`load_session_maps`) into one float32 array of shape
   (n_sessions, n_subjects, n_voxels) over the analysis mask: the voxels where every map read is
   non-zero and finite (the intersection of the runs' brain masks, since first-level maps are 0
   outside them). A session with several usable runs contributes their mean;
3. for each session contrast (``infusion - baseline``) builds each subject's within-subject change
   map, the weighted sum of its session maps (:func:`compute_change_maps`); a subject without a
   usable run in a session the contrast needs drops out of that contrast (logged, counted in the
   sidecars and in ``n_per_group``). The same group tests run on the reference-session maps
   themselves (baseline equivalence, ``ses-<reference>``). With three or more sessions
   (``inference.repeated_measures``), two more analyses use every session: the repeated-measures
   model of :mod:`fcflow.repeated` (``ses-groupBySession``: the group x session interaction and
   the session main effect, F tests on within-subject differences, subjects as exchangeability
   blocks) and each subject's mean over the sessions (``ses-sessionMean``: the group main
   effect, F over the groups);
4. fits the cell-means design (:func:`fcflow.stats.make_group_design`: one column per group and
   the recipe's covariates from ``participants.tsv``, demeaned; ``mean_fd`` is the session
   contrast applied to the QC ``mean_fd_mm``, :func:`contrast_mean_fd`: the change in motion for
   a change map, the motion of the session for one session) and tests every group contrast
   (t, two-sided unless ``inference.two_sided = false``) and F test (:func:`run_inference`);
5. writes statistic maps, -log10 corrected p maps per inference, the primary inference's
   thresholded map and cluster table, per-cluster subject means and plots, and finally
   ``group/results.tsv`` (:func:`write_results`).

Outputs, in ``OUTPUT_DIR/group/task-<t>/desc-<measure>/`` (:func:`measure_dir`; BIDS-derivative
names, ``stat`` before ``desc`` as the statistical-model derivatives proposal writes them; entities
BIDS does not define, ``seed``, ``contrast``, ``stat``, ``inference``, ``alpha``, ``cluster``, are
declared in fcflow's pybids configuration, :data:`fcflow.derivatives.PYBIDS_CONFIG`; every image
and table has a JSON sidecar with the design matrix, contrast weights, subjects and their group,
dropped subjects and why, inference settings, permutations, seed and software)::

    ses-<sessioncontrast>_task-<t>_space-<s>_res-<r>_seed-<seed>_contrast-<c>_
        stat-{t,F}_desc-<measure>_statmap.nii.gz                          statistic
        stat-z_desc-<measure>_statmap.nii.gz                              z of the same tail probability
        stat-logpFWE_inference-<m>_desc-<measure>_statmap.nii.gz          -log10 corrected p, per inference
        stat-logpFamilyFWE_inference-<m>_desc-<measure>_statmap.nii.gz    the same, over all group tests too
        stat-{t,F}_inference-<primary>_alpha-0p05_desc-<measure>_statmap.nii.gz   statistic where significant
        inference-<primary>_alpha-0p05_desc-<measure>_clusters.tsv        cluster table (Julich-Brain areas)
        inference-<primary>_alpha-0p05_cluster-<k>_desc-<measure>_clustermeans.{tsv,png}
                                                           subject means in the cluster per session
        desc-<measure>_regions.tsv                         region level (below)

and, in ``OUTPUT_DIR/group/``::

    results.tsv             one row per task x measure x seed x session analysis x test
                            (``skip_reason`` says why a test could not run; file columns are
                            relative to OUTPUT_DIR)
    baseline_results.tsv    the same tests on the reference session (baseline equivalence)

Region level (recipe ``[regions]``, :mod:`fcflow.regions`): every test is also run on each
subject's mean map value over each Julich-Brain area (or each label of a user's label image)
that the recipe declares (``areas``), with the same design and statistic, FWE over those
regions by max-T permutation and FDR q; one ``_regions.tsv`` per test (``region_table``,
``n_significant_regions`` in ``results.tsv``). It is a second, declared family beside the
voxel-wise one. Without the Julich-Brain atlas (``atlas_dir`` None) and no label image in the
recipe it is skipped with a warning.

Inference methods: ``tfce``, ``maxt``, ``cluster_mass`` and ``cluster_size`` by permutation
(:func:`fcflow.permutation.permutation_test`, one call per test for all of them); ``fdr``
(Benjamini-Hochberg q of the parametric p) and ``bonferroni`` as nilearn's
``threshold_stats_img`` computes them on the z map within the mask (two-sided p = 2 sf(|z|));
``cluster_extent`` keeps voxels with parametric p < ``cluster_forming_p`` in clusters of at least
``min_cluster_voxels`` voxels, as ``threshold_stats_img(height_control="fpr",
cluster_threshold=...)`` does. That last one is an extent rule of thumb, not a family-wise error
control: use a permutation method as ``primary``.

Unequal group variances (``inference.variance_groups = "auto"``, the default): the study groups
are variance groups, subjects are sign-flipped instead of permuted, and the statistic is the
weighted least-squares t (or F) with one variance ratio per group for the whole map
(``group_variances = "brain"``) or Winkler's v (or G) with each group's variance at every voxel
(``"voxel"``); see :mod:`fcflow.permutation`. F tests run their permutation inferences on z.
Every test's sidecars name the statistic (``StatisticComputed``) and, when the design has
covariates, the design diagnostics (``DesignDiagnostics``: each covariate's variance inflation
factor and correlation with each group, the inflation of the contrast's variance; a warning
above ``inference.max_vif``). With ``inference.family_wise = "contrasts"`` (default) the
permutation p maps are also corrected over all group tests of a map and session contrast
(:func:`fcflow.permutation.combine_family_wise`), written beside the per-test maps and indexed in
``results.tsv`` (``logp_family_map``, ``min_p_family``).
"""
