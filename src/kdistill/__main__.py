"""``python -m kdistill ...`` = the ``kdistill`` command (for a venv whose scripts are not on ``PATH``)."""

from .cli import main

main()
