"""The paper's evaluation: metric formulas (`metrics`; the SynthRAD2023 challenge's exact ones
in `synthrad`), scoring of test volumes (`scoring`; in the CT's own geometry: `native`), the
evaluation job (`paired`), sCT folders against CT folders (`sct_folder`), data fingerprints
(`fingerprint`), tables and t-tests (`reports`, `compare`), PNG figures (`figures`)."""
