"""Deploying dynamic-workload: what `./setup.sh aws` and `./deploy.sh aws` run.

`aws_setup` (`./setup.sh aws`) prepares a cluster once: key pair (keypair.py), network and
security group (network.py), the endpoints' IAM role and profile (iam.py), recorded in a state
file (cluster.py: names, region, the record). `aws` (`./deploy.sh aws`) launches the two
endpoint instances and installs them over SSH (install.py); `destroy` removes a cluster. The
scaler's settings table (cron/config.py) is all that this package takes from cron/.
"""
