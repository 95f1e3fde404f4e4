"""explore: design-space exploration on top of archspec and builder.

`diagram` draws a spec like the paper's overview figure, `compare` tabulates (and optionally
measures and trains) several specs, `sweep` expands a grid of `--set` overrides into specs and
compares them with resumable results, `erf` measures effective receptive fields (Figure 2 of the
paper). The CLI commands in cli.py only parse options and render what these return.
"""
