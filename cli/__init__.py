"""What every program's command line shares: the settings table (settings.py: flags with DW_*
environment fallbacks, `--help` generated from it) and Ctrl-C handling (interrupts.py).

Standard library only and Python 3.9, like the worker: provisioning copies this folder to the
worker hosts beside worker/, so that the worker reads its settings with the same code as every
other program.
"""
