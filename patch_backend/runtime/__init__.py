"""What runs each captured graph: the dispatcher and its variant cache."""
