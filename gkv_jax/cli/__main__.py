"""`python -m gkv_jax.cli`: the `gkv-jax` command."""

import sys

from gkv_jax.cli import main

sys.exit(main())
