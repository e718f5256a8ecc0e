"""Running sceneref on a real cluster: the KubeRay RayService, the Ray cluster-launcher config,
the container recipe, and the commands that keep them consistent with serve_config.yaml.

A package only so `python -m cluster.rayservice` and `python -m cluster.check` work from the
repository root; pipeline/, scorers/ and deployments/ never import it (it is configuration)."""
