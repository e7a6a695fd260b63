"""The scaler: one run per minute on each endpoint host (cron), deciding how many workers to
launch for its endpoint's queue and launching and provisioning them.

scale.py is the run (reconcile, decide, launch, record), config.py its settings, policy.py the
decision (a pure function), state.py its record (decision and circuit breaker), provision.py a
worker's install over SSH, providers/ where workers run (local processes, SSH hosts, EC2).
"""
