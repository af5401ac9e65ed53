"""`python -m tui.cli`: the same entry point as the `unlearn` script."""
from tui.cli.main import main

main()
