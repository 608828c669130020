"""`python -m host`: the tenantfleet CLI."""
from host.cli import main

main()
