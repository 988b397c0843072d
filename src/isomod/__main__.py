"""`python -m isomod ...`, which is also how torchrun starts it: `torchrun --nproc_per_node=P -m isomod train ...`."""

import sys

from isomod.cli import main

sys.exit(main())
