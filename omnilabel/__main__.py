"""``python -m omnilabel`` runs the command line."""

from omnilabel.cli import main

main()
