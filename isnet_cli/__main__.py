"""`python -m isnet_cli ...` (also what `torchrun -m isnet_cli train ...` runs)."""

from isnet_cli.cli import main

main()
