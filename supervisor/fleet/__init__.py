"""The one owner of live model state, and the units it drives: hosting, adoption, liveness, GPU meter, rollout."""
