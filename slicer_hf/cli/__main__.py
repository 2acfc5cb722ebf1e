"""`python -m slicer_hf.cli`: the `slicer-hf` command."""

from . import main

main()
