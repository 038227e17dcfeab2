"""``python -m omnilabel.cli`` runs the command line."""

from omnilabel.cli import main

main()
