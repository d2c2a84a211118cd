"""`python -m ftcli ...` runs the same CLI as the `ftcli` command (the ranks of ftcli's launcher run it)."""

from ftcli.system import die_with_launcher

die_with_launcher()  # first, before the seconds of imports: a rank never outlives its launcher

from ftcli.cli import entrypoint  # noqa: E402

entrypoint()
