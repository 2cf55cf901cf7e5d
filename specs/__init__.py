"""The specs mirasc ships: one YAML file per model (`mirasc list` shows them)."""
