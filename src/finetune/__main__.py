"""`python -m finetune` runs the command line."""

from finetune.cli import main

main()
