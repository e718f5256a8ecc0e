"""Ray Serve layer: the HTTP ingress with its auth, upload checks and signed URLs, and the
deployments that wrap the pipeline and the scorers. Framework-level pieces here import no Ray."""
