"""RL algorithms: loss functions named after the papers' terms, and learners that apply them."""
