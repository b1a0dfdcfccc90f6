"""What every command shares: the runner (flags, help, one-line errors) and the huge-page
re-exec."""
