"""The built-in synthetic hip/pelvis phantom: anatomy (shapes), rendering, and the cohort writer.

`shapes` -> `anatomy` (a subject's tissues per axial slice) -> `render` (CT in HU, T1-like MR,
labels on a grid) -> `cohort` (subjects per set as NIfTI folders);
`python -m mr2ct_jax.data.phantom OUT` runs `cohort.generate`.
"""
