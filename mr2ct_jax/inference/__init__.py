"""Running trained generators: load one (`generators`), batch slices through it (`slices`),
translate whole volumes (`volumes`), or run an export with NumPy alone (`numpy_generator`)."""
