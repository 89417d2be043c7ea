"""`python -m mendctl`."""
from .cli import main

main()
