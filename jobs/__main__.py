"""`python -m jobs <job> [flags]`: the same as the `gatrep` command."""
from gatrep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
