"""``python -m listener``: the ``image-listener`` command without the console script."""

from listener.commands.cli import main

main()
