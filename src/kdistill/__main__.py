"""``python -m kdistill ...`` = the ``kdistill`` command (for a venv whose scripts are not on ``PATH``)."""

from .cli import main

if __name__ == "__main__":
    main()
