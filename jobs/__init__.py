"""Entry points for `python -m jobs.<job>` (run from the repository or a `ray job submit --working-dir`): each
module only hands over to gatrep.cli, where the jobs live."""
