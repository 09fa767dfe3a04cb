"""srl: distributed reinforcement learning."""
