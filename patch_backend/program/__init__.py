"""From active patches to a patched program: the plan, the FX insertion pass, the ops, the eager interpreter."""
