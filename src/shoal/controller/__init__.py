"""The controller reconciles desired state (apps, deployments, replica counts) with running replicas."""
