"""``python -m agent.cli`` is the ``edgecap`` command."""

from agent.cli import main

main()
