"""The paper's study as one command: cells, resumable runs, one report (`paper`)."""
