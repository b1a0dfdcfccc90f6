"""Downstream segmentation via synthesis (the paper's section 3.2).

A 2-channel U-Net (`mr2ct_jax.models.unet`) is trained on the labeled CT split with input
(CT, sMR = G_mr(CT)) and tested on MR volumes with input (sCT = G_ct(MR), MR): channel 0 is
always the CT-like image and channel 1 the MR-like one. The generators come frozen from a
CycleGAN workdir. Dice per structure per test volume measures how well the synthesis carries
CT labels over to MR.

Modules: `dice` (NumPy Dice), `labels` (classes from the data, label tables, label checks),
`losses` (cross-entropy + soft Dice), `data` (sMR cache and the augmented batch sampler),
`train` (jitted step and loop, Orbax checkpoints; 1 or 2 input channels), `evaluate`
(prediction and reports), `figures` (box plot, Fig. 7 label panels), `run` (the whole
command), `__main__` (`python -m mr2ct_jax.segmentation`), `compare` (Dice t-tests between two
evaluations), `baseline` + `baseline_run` + `folds` (the k-fold single-modality MR baseline).
"""
