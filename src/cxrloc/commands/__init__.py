"""One module per ``cxrloc`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
