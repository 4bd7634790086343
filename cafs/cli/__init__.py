"""The `cafs` command line, run in the user's `cafs` process: parsing and printing over the
other packages, one module per group of subcommands.

Apart so that no library module (daemon, mounts, weights) carries argparse handlers or
terminal output, and each command imports only the module it runs (cafs/cli/app.py).
"""
