"""`ftcli prepare`: registered on the app by importing this module (see ftcli/cli.py)."""
