"""What the scaler (cron/) and the deploy (deploy/) both use to reach machines, so that neither
imports the other: AWS as the cluster's commands see it (aws.py: the cluster's name, the region
rule, setup's record read, clients and errors), EC2 (ec2.py: tags, listings, the launch,
termination, waits) and SSH (ssh.py: sessions with pinned host keys, remote commands, uploads).
"""
