"""The `finetune` command's entry point.

It marks the process as started by the command before anything imports `finetune`, so that
`import finetune` defers its public names (and Keras and TensorFlow, about 3 s) until a command
uses them: `finetune --help` and `finetune predict RUN ...` from the run's kept conversion
(`finetune.kept`) never load TensorFlow. Everywhere else `import finetune` imports everything
at once, so that Keras can load finetune's models as soon as it is imported.
"""

STARTED = False


def main() -> None:
    """Runs `finetune.cli.main` in a process marked as started by the command."""
    global STARTED
    STARTED = True
    from finetune.cli import main as cli_main

    cli_main()
