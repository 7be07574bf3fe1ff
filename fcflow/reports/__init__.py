"""Reports a scientist reads before trusting a result: one page per participant, one for the group.

* :mod:`fcflow.reports.participant`: per run, the seed on the template and on the mean BOLD,
  motion and censoring, carpet plots before and after denoising, tSNR, the seed signal, the maps
  and the exclusion decision (``OUTPUT_DIR/sub-<label>.html``);
* :mod:`fcflow.reports.group`: the design, motion by group x session with tests, QC-FC with and
  without denoising, every contrast's result, and a methods paragraph (``OUTPUT_DIR/group.html``);
* :mod:`fcflow.reports.figures` (matplotlib and nilearn, no display), :mod:`fcflow.reports.methods`
  (the paragraph) and :mod:`fcflow.reports.render` (jinja2 templates in ``templates/``).

The numbers they show are computed in the science layer (:mod:`fcflow.qc`, which never imports
this package); no nipype here (the participant report's nodes are in :mod:`fcflow.interfaces.reports`).
"""
