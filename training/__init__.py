"""Training and evaluation of overlock models (`overlock train`, `overlock eval`).

Where things are:
- commands.py: the typer commands (options only); runner.py: the Python API they call;
- config.py: every option with its default, bounds and help text (pydantic);
- setup.py: checks spec + data + options before anything is written; loop.py: the training loop;
- data.py, augment.py, sampler.py: data sources, transforms, resumable/sharded sampling;
- loss.py, optim.py, schedule.py, ema.py: the OverLoCK recipe's pieces;
- checkpoint.py, rundir.py, plot.py, progress.py: what a run writes and shows;
- distributed.py: torchrun / DDP process groups; evaluate.py: top-1/top-5/loss.
"""
