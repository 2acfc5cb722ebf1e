"""`slicer-hf`: serve the suffix of a model, run the end-to-end demo, query a server, evaluate and benchmark.

One module per group of commands (`serving`, `generation`, `measure`), registered here on one Typer `app` in the
order `--help` lists them; each command imports the parts it needs (gRPC, Ray, a benchmark) when it runs.
"""

from __future__ import annotations

import sys
import warnings

import typer

from . import generation, measure, serving

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SLICER split inference for Hugging Face LMs.")


def _version(shown: bool) -> None:
    if shown:
        from ..version import __version__

        print(f"slicer-hf {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """SLICER split inference for Hugging Face LMs."""


for command in (serving.serve, serving.stats, serving.drain, generation.demo, generation.generate, generation.chat):
    app.command()(command)
app.command("eval")(measure.eval_)
for command in (measure.profile, measure.calibrate, measure.search):
    app.command()(command)
# a suite's own options (and its --help) pass through to it
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})(
    measure.bench
)

__all__ = ["app", "main"]


def main() -> None:
    from ..errors import SlicerError

    # a warning for the user, not a traceback frame: one line, as the errors below
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except (SlicerError, NotImplementedError) as exc:  # a refusal, a dead link, a bad config, a family not split
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
