"""``python -m bench.worker --cell cell.json --out ranks/``: what `accelerate launch` runs in each rank."""

import sys

from bench.worker.train import main

sys.exit(main())
