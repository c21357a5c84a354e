"""The console scripts: one module per command (``classification`` and ``predict`` hold the entry
points of a family of commands), each a thin argparse front over the library. All of them report
bad input the same way (:func:`nnunet_acnorm.commands._cli.run_command`): one line
``<command>: error: <what is wrong and what to do>`` on stderr and exit status 1; argparse's usage
errors exit with 2; an interrupt exits with 130. Library code never imports this package.
"""
