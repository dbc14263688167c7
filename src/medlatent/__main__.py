"""`python -m medlatent ...`, also under a launcher: `accelerate launch -m medlatent gap ...`,
`torchrun --nproc_per_node N -m medlatent gap ...`."""

from .cli import main

main()
