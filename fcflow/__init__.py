"""fcflow: seed-to-voxel functional connectivity of drug studies on fMRIPrep derivatives."""

__version__ = "0.1.0"
