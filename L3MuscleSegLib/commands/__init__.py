"""One module per ``l3muscleseg`` sub-command.

Each module defines ``NAME`` (the sub-command), ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. The CLI discovers them, so adding a command touches no other file.
"""
