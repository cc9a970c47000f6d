"""The `shoal` command line (also `python -m shoal`), mirroring Ray Serve's `serve` CLI.

One module per family of commands, each joining the `main` group here:

- `run.py`: `shoal run`, a foreground instance owned by the command;
- `instance.py`: `start`, `deploy`, `status`, `config`, `shutdown` (a detached instance, over its
  admin API) and `build`; `ray.py`: the same commands against a Ray cluster (`--runtime ray`);
- `llm.py`: `shoal llm serve`; `dashboard.py`: `shoal dashboard` (the detached instance's web page);
- `output.py`: the status table and deploy progress; `common.py`, `signals.py`: shared options,
  messages and Ctrl-C handling.

Resolving import paths is not CLI code: it lives in `shoal/import_path.py`, shared with the config
schema. Only click and the command modules load here, so `shoal --help` stays fast.
"""

from __future__ import annotations

import click

from shoal import __version__
from shoal.cli import dashboard, instance, llm, run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="shoal", message="%(prog)s %(version)s")
def main() -> None:
    """shoal: Ray Serve's programming model on one machine."""


for _command in (run.run, *instance.COMMANDS, dashboard.dashboard, llm.llm):
    main.add_command(_command)

__all__ = ["main"]
