"""`python -m ftcli ...` runs the same CLI as the `ftcli` command."""

from ftcli.cli import entrypoint

entrypoint()
