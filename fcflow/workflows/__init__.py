"""Workflow factories (init_*_wf) and how they are run."""
