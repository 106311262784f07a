"""``python -m classlens.cli``: the same as the ``classlens`` command."""

from classlens.cli import main

main()
