"""The ``ebcompile`` command line: thin subcommands over the Python API."""
