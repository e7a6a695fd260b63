"""Deploying dynamic-workload: what `./deploy.sh local`, `./setup.sh aws` and `./deploy.sh aws` run.

Locally: `supervise` starts services in process groups of their own, restarts one that exits
(with a back-off, and gives up after repeated crashes) and stops them by their groups; `local`
is `./deploy.sh local` once its options are checked: both endpoints and their scalers on this
machine, under that supervision.

On AWS: `aws_setup` (`./setup.sh aws`) prepares a cluster once: key pair (keypair.py), network
and security group (network.py), the endpoints' IAM role and profile (iam.py), recorded in a
state file (cluster.py: names, region, the record). `aws` (`./deploy.sh aws`) launches the two
endpoint instances and installs them over SSH (install.py); `destroy` removes a cluster. Of the
programs it installs, this package takes only their settings tables (cron/config.py,
endpoint/config.py).
"""
