"""`python -m davae_cli ...` (and `accelerate launch -m davae_cli ...`)."""

from .cli.app import main

main()
