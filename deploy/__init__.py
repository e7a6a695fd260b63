"""Deploying dynamic-workload: what runs the services and keeps them running.

`supervise` starts services in process groups of their own, restarts one that exits (with a
back-off, and gives up after repeated crashes) and stops them by their groups; `local` is
`./deploy.sh local` once its options are checked: both endpoints and their scalers on this
machine, under that supervision.
"""
