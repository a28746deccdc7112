"""One module per pipeline stage; each exposes a plain function that the CLI and tests call."""
