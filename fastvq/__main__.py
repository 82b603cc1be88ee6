"""`python -m fastvq ...` is the `fastvq` command."""
from .cli import main

raise SystemExit(main())
