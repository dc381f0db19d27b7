"""From Dynamo's graphs to names: captures, the naming rules, the per-model index."""
