"""`python -m lutq` runs the command line."""

from lutq.cli import main

main()
