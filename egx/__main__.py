"""``python -m egx ...`` (also ``torchrun --nproc_per_node N -m egx train ...``)."""
from .cli import main

raise SystemExit(main())
