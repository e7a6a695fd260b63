"""The worker: claims jobs from both endpoints, computes them and posts the results.

Standard library only, Python 3.9: provisioning copies this folder and cli/ (the settings code
that config.py uses) to a host and starts `python -m worker`. runner.py holds the supervisor and
its slot processes, dispatch.py the claims, leases and results of all slots, slot.py the hashing
in lanes, client.py the endpoints' worker API, hashing.py the job, native.py the native hashing
kernels.
"""
