"""The paper's evaluation: metric formulas (`metrics`), scoring of test volumes (`scoring`),
the evaluation job (`paired`), tables and t-tests (`reports`, `compare`), PNG figures
(`figures`)."""
