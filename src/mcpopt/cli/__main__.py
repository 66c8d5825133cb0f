"""`python -m mcpopt.cli ...` (the benchmarks start gateways this way)."""

from mcpopt.cli import main

main()
