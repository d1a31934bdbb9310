"""`python -m llama3_mini ...` is the `llama3-mini` command."""
import sys

from .cli import main

sys.exit(main())
